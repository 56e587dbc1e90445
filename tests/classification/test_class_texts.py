import datasets
import pytest
import torch

from mmft_hf.classification.class_texts import class_texts_from_captions, prototypes_from_captioned_dataset
from mmft_hf.classification.prototypes import build_class_prototypes


def test_class_texts_prefix_fallback_and_order():
    captions = [["red and round", "  "], ["blue", "square"], None, ["another red one"], []]
    labels = [0, 1, 1, 0, 2]
    names = ["red circle", "blue square", "green cross", "yellow star"]
    texts = class_texts_from_captions(captions, labels, names)
    assert texts == [
        ["a photo of a red circle. red and round", "a photo of a red circle. another red one"],
        ["a photo of a blue square. blue", "a photo of a blue square. square"],
        ["a photo of a green cross"],  # only empty captions: the inference fallback (no period)
        ["a photo of a yellow star"],  # no rows at all
    ]
    bare = class_texts_from_captions(captions, labels, names, class_template=None, fallback_template="{} shape")
    assert bare[0] == ["red and round", "another red one"] and bare[3] == ["yellow star shape"]


def test_class_texts_errors_name_the_row():
    with pytest.raises(ValueError, match="2 caption lists but 1 labels"):
        class_texts_from_captions([["a"], ["b"]], [0], ["x"])
    with pytest.raises(ValueError, match=r"Row 1: label 5"):
        class_texts_from_captions([["a"], ["b"]], [0, 5], ["x", "y"])
    with pytest.raises(ValueError, match="Row 0: captions must be a list"):
        class_texts_from_captions(["a caption"], [0], ["x"])
    with pytest.raises(ValueError, match="placeholder"):
        class_texts_from_captions([["a"]], [0], ["x"], class_template="a photo.")


def test_prototypes_from_captioned_dataset_matches_manual(tiny_clip, synthetic_dataset):
    model, processor = tiny_clip
    train = synthetic_dataset["train"]
    names = train.features["label"].names
    expected_texts = [[] for _ in names]
    for row in train:  # independent grouping, row by row
        expected_texts[row["label"]] += [f"a photo of a {names[row['label']]}. {c}" for c in row["captions"]]
    with torch.no_grad():
        expected = build_class_prototypes(model, processor.tokenizer, expected_texts)
        prototypes, labels = prototypes_from_captioned_dataset(model, processor, train, batch_size=7)
    assert labels == names
    assert sum(len(t) for t in expected_texts) == 4 * 8 * 3
    torch.testing.assert_close(prototypes, expected, atol=1e-5, rtol=1e-4)


def test_prototypes_from_dataset_with_string_labels_and_missing_columns(tiny_clip):
    model, processor = tiny_clip
    dataset = datasets.Dataset.from_dict(
        {"cls": ["dotted", "banded", "dotted"], "texts": [["dots"], ["bands"], ["more dots"]]}
    )
    with torch.no_grad():
        prototypes, labels = prototypes_from_captioned_dataset(
            model, processor.tokenizer, dataset, label_column="cls", caption_column="texts"
        )
        expected = build_class_prototypes(
            model,
            processor.tokenizer,
            [["a photo of a banded. bands"], ["a photo of a dotted. dots", "a photo of a dotted. more dots"]],
        )
    assert labels == ["banded", "dotted"]
    torch.testing.assert_close(prototypes, expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"no column\(s\) \['captions'\]"):
        prototypes_from_captioned_dataset(model, processor, dataset, label_column="cls")
    ints = datasets.Dataset.from_dict({"label": [0, 1], "captions": [["a"], ["b"]]})
    with pytest.raises(ValueError, match="class_names"):
        prototypes_from_captioned_dataset(model, processor, ints)


def test_class_texts_from_sentences():
    captions = [["Red and round. About 3.5 cm wide, e.g. a coin.", " "], ["Blue!"], ["One more. Done"]]
    texts = class_texts_from_captions(captions, [0, 1, 0], ["red circle", "blue square"], caption_sampling="sentence")
    assert texts == [
        ["a photo of a red circle. Red and round.", "a photo of a red circle. About 3.5 cm wide, e.g. a coin.",
         "a photo of a red circle. One more.", "a photo of a red circle. Done"],
        ["a photo of a blue square. Blue!"],
    ]  # fmt: skip
    with pytest.raises(ValueError, match="caption_sampling must be one of"):
        class_texts_from_captions([["a"]], [0], ["x"], caption_sampling="words")


def test_prototypes_from_sentences_match_manual_and_travel_with_the_checkpoint(tiny_clip, synthetic_dataset, tmp_path):
    """Prototypes average each sentence with the template, as the model trained; the trainer builds them so, records
    the setting with the saved prototypes, and `prototypes_from_captioned_dataset` rebuilds them from it."""
    from mmft_hf.classification.prototypes import load_class_prototypes
    from mmft_hf.training.arguments import MMFTTrainingArguments
    from mmft_hf.training.trainer import MMFTTrainer

    model, processor = tiny_clip
    train = synthetic_dataset["train"].select(range(8))
    names = train.features["label"].names
    joined = [[" ".join(row_captions[:2]) + ". " + row_captions[2]] for row_captions in train["captions"]]
    train = train.remove_columns("captions").add_column(
        "captions", joined, feature=datasets.List(datasets.Value("string"))
    )
    expected_texts = [[] for _ in names]
    for label, row_captions in zip(train["label"], joined, strict=True):  # independent split: at the ". " we put
        first, second = row_captions[0].rsplit(". ", 1)
        expected_texts[label] += [f"a photo of a {names[label]}. {first}.", f"a photo of a {names[label]}. {second}"]
    args = MMFTTrainingArguments(
        output_dir=str(tmp_path), caption_sampling="sentence", eval_strategy="no", use_cpu=True, report_to=[],
        per_device_train_batch_size=4,
    )  # fmt: skip
    trainer = MMFTTrainer(model=model, args=args, train_dataset=train, processing_class=processor)
    assert trainer.prototype_texts() == expected_texts
    with torch.no_grad():
        expected = build_class_prototypes(model, processor.tokenizer, expected_texts)
        prototypes, _ = prototypes_from_captioned_dataset(model, processor, train, caption_sampling="sentence")
    torch.testing.assert_close(prototypes, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(trainer.compute_class_prototypes(), expected, atol=1e-5, rtol=1e-4)
    trainer.save_model()
    saved, labels, metadata = load_class_prototypes(str(tmp_path))
    assert metadata["caption_sampling"] == "sentence" and labels == names
    torch.testing.assert_close(saved, expected, atol=1e-5, rtol=1e-4)
