"""Zero-shot retention: the accuracy against an independent zero-shot computation, and the retention sets."""

import datasets
import pytest
import torch
import torch.nn.functional as F

from mmft_hf.evaluation.retention import load_retention_set, zero_shot_accuracy
from mmft_hf.synthetic import make_synthetic_dataset, synthetic_class_names


def reference_zero_shot_accuracy(model, processor, dataset, class_names) -> float:
    """Independent zero-shot CLIP: one prompt per class, cosine similarity, argmax (no mmft_hf code)."""
    model.eval()
    with torch.no_grad():
        texts = processor.tokenizer(
            [f"a photo of a {name}" for name in class_names], padding=True, return_tensors="pt"
        )
        text = model.get_text_features(**texts)
        text = F.normalize(getattr(text, "pooler_output", text), dim=-1)
        pixels = processor.image_processor(images=[image.convert("RGB") for image in dataset["image"]],
                                           return_tensors="pt")["pixel_values"]  # fmt: skip
        image = model.get_image_features(pixel_values=pixels)
        image = F.normalize(getattr(image, "pooler_output", image), dim=-1)
    predictions = (image @ text.T).argmax(-1)
    return (predictions == torch.tensor(dataset["label"])).float().mean().item()


def test_zero_shot_accuracy_matches_an_independent_computation(tiny_clip, synthetic_dataset):
    model, processor = tiny_clip
    test = synthetic_dataset["test"]
    names = test.features["label"].names
    expected = reference_zero_shot_accuracy(model, processor, test, names)
    model.train()
    assert zero_shot_accuracy(model, processor, test, names, batch_size=5) == pytest.approx(expected, abs=1e-9)
    assert model.training  # evaluated in eval mode, given back in the mode it was in
    # the labels matter: a shifted class-name list gives a different (here: the rotated classes') accuracy
    rotated = names[1:] + names[:1]
    assert zero_shot_accuracy(model, processor, test, rotated) == pytest.approx(
        reference_zero_shot_accuracy(model, processor, test, rotated), abs=1e-9
    )


def test_synthetic_retention_set_has_classes_the_demo_never_trains_on():
    retention = load_retention_set("synthetic")
    trained = set(make_synthetic_dataset(num_classes=8, train_per_class=1, eval_per_class=1)["train"].features[
        "label"].names)  # fmt: skip
    assert len(retention.class_names) == 8 and not set(retention.class_names) & trained
    assert retention.class_names == synthetic_class_names(16)[8:]
    assert len(retention.dataset) == 64 and sorted(set(retention.dataset["label"])) == list(range(8))


def test_retention_set_from_a_folder_with_a_class_names_file(tmp_path, synthetic_dataset):
    plain = synthetic_dataset.cast_column("label", datasets.Value("int64"))
    plain.save_to_disk(tmp_path / "data")
    with pytest.raises(ValueError, match="no class names.*--retention_class_names"):
        load_retention_set(str(tmp_path / "data"))
    names_file = tmp_path / "names.txt"
    names_file.write_text("\n".join(f"class {i}" for i in range(4)) + "\n")
    retention = load_retention_set(str(tmp_path / "data"), split="validation", class_names=str(names_file))
    assert retention.class_names == ["class 0", "class 1", "class 2", "class 3"]
    assert len(retention.dataset) == len(synthetic_dataset["validation"])
    with pytest.raises(ValueError, match="split 'dev' is not in.*--retention_split"):
        load_retention_set(str(tmp_path / "data"), split="dev")
    names_file.write_text("one\ntwo\n")
    with pytest.raises(ValueError, match="labels run from 0 to 3, but 2 class names"):
        load_retention_set(str(tmp_path / "data"), class_names=str(names_file))


def test_a_missing_column_names_the_flags_that_exist(tmp_path, synthetic_dataset):
    """The retention set is read with the training data's --image_column / --label_column (there is no
    --retention_image_column); the error says so."""
    synthetic_dataset.rename_column("image", "img").save_to_disk(tmp_path / "data")
    with pytest.raises(ValueError) as error:
        load_retention_set(str(tmp_path / "data"))
    message = str(error.value)
    assert "has no column 'image'" in message and "'img'" in message
    assert "(--image_column, --label_column)" in message and "--retention_image_column" not in message
