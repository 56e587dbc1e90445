import base64
import logging

import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor, pipeline

from mmft_hf.classification import remote_pipeline
from mmft_hf.classification.pipeline import MMFTClassificationPipeline, resolve_templates
from mmft_hf.classification.prototypes import (
    OPENAI_IMAGENET_TEMPLATES,
    PROTOTYPES_FILENAME,
    load_class_prototypes,
    save_class_prototypes,
    zero_shot_prototypes,
)
from mmft_hf.training.collator import MMFTDataCollator

NAMES = ["red circle", "green square", "blue triangle", "yellow cross"]


def random_prototypes(num_classes, dim, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=generator), dim=-1)


def save_classifier(model, processor, directory, labels=NAMES, prototypes=None):
    """A checkpoint as the trainer writes it: model, processor, id2label and the prototypes file."""
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {label: index for index, label in enumerate(labels)}
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    if prototypes is None:
        prototypes = random_prototypes(len(labels), model.config.projection_dim)
    save_class_prototypes(prototypes, labels, str(directory))
    return prototypes


@pytest.fixture
def classifier_dir(tmp_path, tiny_clip):
    model, processor = tiny_clip
    save_classifier(model, processor, tmp_path / "clf")
    return str(tmp_path / "clf")


@pytest.fixture(scope="module")
def images(synthetic_dataset):
    return list(synthetic_dataset["test"].select(range(6))["image"])


def reference_scores(model, processor, prototypes, images):
    """Independent computation: processor batch -> image features -> exp(scale) * cosine -> softmax."""
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        features = model.get_image_features(pixel_values=pixels).pooler_output
        cosine = (features / features.norm(dim=-1, keepdim=True)) @ (
            prototypes / prototypes.norm(dim=-1, keepdim=True)
        ).T
        return (model.logit_scale.exp() * cosine).softmax(dim=-1)


def as_matrix(outputs, labels):
    """Pipeline outputs (one list per image) -> [num_images, num_classes] scores in label order."""
    return torch.tensor([[{o["label"]: o["score"] for o in out}[label] for label in labels] for out in outputs])


def test_directory_checkpoint_matches_reference(classifier_dir, images):
    classifier = pipeline("mmft-classification", model=classifier_dir, device="cpu")
    assert isinstance(classifier, MMFTClassificationPipeline)
    model = CLIPModel.from_pretrained(classifier_dir)
    prototypes, labels, _ = load_class_prototypes(classifier_dir)
    expected = reference_scores(model, classifier.image_processor, prototypes, images)
    outputs = classifier(images, top_k=len(NAMES))
    assert len(outputs) == len(images)
    torch.testing.assert_close(as_matrix(outputs, labels), expected, atol=1e-5, rtol=1e-4)
    for out in outputs:  # sorted by score, all classes, scores sum to one
        scores = [o["score"] for o in out]
        assert scores == sorted(scores, reverse=True)
        assert sorted(o["label"] for o in out) == sorted(NAMES)
        assert sum(scores) == pytest.approx(1.0, abs=1e-5)
        assert all(isinstance(o["label"], str) and isinstance(o["score"], float) for o in out)


def test_single_image_gives_single_list_and_batching_is_invisible(classifier_dir, images):
    classifier = pipeline("mmft-classification", model=classifier_dir, device="cpu")
    single = classifier(images[0])
    assert isinstance(single, list) and isinstance(single[0], dict)
    one_by_one = classifier(images)
    batched = classifier(images, batch_size=4)  # 6 images: a full and a partial batch
    assert len(batched) == 6
    for a, b in zip(one_by_one, batched):
        assert [o["label"] for o in a] == [o["label"] for o in b]
        assert [o["score"] for o in a] == pytest.approx([o["score"] for o in b], abs=1e-5)
    assert single == one_by_one[0]


def test_top_k_default_clamp_and_validation(classifier_dir, images):
    classifier = pipeline("mmft-classification", model=classifier_dir, device="cpu")
    assert len(classifier(images[0])) == 4  # default 5, clamped to the 4 classes
    assert len(classifier(images[0], top_k=100)) == 4
    two = classifier(images[0], top_k=2)
    assert [o["label"] for o in two] == [o["label"] for o in classifier(images[0])[:2]]
    init_top_k = pipeline("mmft-classification", model=classifier_dir, device="cpu", top_k=1)
    assert len(init_top_k(images[0])) == 1
    for bad in (0, -1, 1.5, "3", True):
        with pytest.raises(ValueError, match="top_k"):
            classifier(images[0], top_k=bad)
    with pytest.raises(TypeError, match="candidate_labels"):
        classifier(images[0], candidate_labels=["a"])


def test_image_inputs_path_numpy_tensor(classifier_dir, images, tmp_path):
    classifier = pipeline("mmft-classification", model=classifier_dir, device="cpu")
    image = images[0].convert("RGB")
    expected = classifier(image, top_k=4)
    png = tmp_path / "img.png"
    image.save(png)
    array = np.asarray(image)
    inputs = [
        str(png),
        png,  # os.PathLike
        array,  # HxWx3 uint8
        np.moveaxis(array, -1, 0).copy(),  # 3xHxW
        array.astype(np.float32) / 255.0,  # floats in [0, 1]
        torch.from_numpy(array.copy()),
    ]
    for given, got in zip(inputs, classifier(inputs, top_k=4)):
        assert [o["label"] for o in got] == [o["label"] for o in expected], type(given)
        assert [o["score"] for o in got] == pytest.approx([o["score"] for o in expected], abs=1e-5)
    gray = Image.new("L", (20, 16), 90)
    from_gray_array = classifier(np.full((16, 20), 90, dtype=np.uint8), top_k=4)
    assert from_gray_array == classifier(gray, top_k=4)


def test_bad_image_inputs_name_the_input(classifier_dir, tmp_path):
    classifier = pipeline("mmft-classification", model=classifier_dir, device="cpu")
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is text, not a PNG")
    with pytest.raises(ValueError, match="notes.png"):
        classifier(str(not_an_image))
    truncated = tmp_path / "truncated.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png")
    truncated.write_bytes((tmp_path / "full.png").read_bytes()[:60])
    with pytest.raises(ValueError, match="truncated.png"):
        classifier([str(truncated)])
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        classifier(str(tmp_path / "missing.jpg"))
    with pytest.raises(TypeError, match="int"):
        classifier(12345)
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 5\)"):
        classifier(np.zeros((2, 3, 4, 5), dtype=np.uint8))


def test_model_and_processor_objects_and_direct_construction(tiny_clip, images):
    model, processor = tiny_clip
    prototypes = random_prototypes(4, model.config.projection_dim, seed=3)
    expected = reference_scores(model, processor, prototypes, images[:2])
    by_factory = pipeline(
        "mmft-classification",
        model=model,
        tokenizer=processor.tokenizer,
        image_processor=processor.image_processor,
        class_prototypes=prototypes,
        labels=NAMES,
        device="cpu",
    )
    with_processor = pipeline(
        "mmft-classification",
        model=model,
        processor=processor,
        class_prototypes=prototypes,
        labels=NAMES,
        device="cpu",
    )
    direct = MMFTClassificationPipeline(
        model=model, image_processor=processor.image_processor, class_prototypes=prototypes, labels=NAMES, device="cpu"
    )
    for classifier in (by_factory, with_processor, direct):
        torch.testing.assert_close(as_matrix(classifier(images[:2], top_k=4), NAMES), expected, atol=1e-5, rtol=1e-4)


def test_prototypes_loaded_once_never_recomputed(classifier_dir, images, monkeypatch):
    reads = []
    original = remote_pipeline.read_prototypes_file
    monkeypatch.setattr(remote_pipeline, "read_prototypes_file", lambda path: reads.append(path) or original(path))
    classifier = pipeline("mmft-classification", model=classifier_dir, device="cpu")
    assert len(reads) == 1

    def no_text(*args, **kwargs):
        raise AssertionError("the text tower must not run at inference")

    monkeypatch.setattr(classifier.model, "get_text_features", no_text)
    (__import__("pathlib").Path(classifier_dir) / PROTOTYPES_FILENAME).unlink()  # not needed after construction
    assert len(classifier(images, batch_size=3)) == 6
    assert len(reads) == 1


def test_zero_shot_single_ensemble_and_custom_templates(tiny_clip_dir, tiny_clip, images):
    model = CLIPModel.from_pretrained(tiny_clip_dir)
    _, processor = tiny_clip
    for templates, expected_templates in (
        (None, ("a photo of a {}",)),
        ("single", ("a photo of a {}",)),
        ("ensemble", OPENAI_IMAGENET_TEMPLATES),
        (["a drawing of a {}.", "art of the {}"], ("a drawing of a {}.", "art of the {}")),
        ("itap of a {}", ("itap of a {}",)),
    ):
        kwargs = {} if templates is None else {"templates": templates}
        classifier = pipeline("mmft-classification", model=tiny_clip_dir, class_names=NAMES, device="cpu", **kwargs)
        reference = zero_shot_prototypes(model, processor.tokenizer, NAMES, expected_templates)
        torch.testing.assert_close(classifier.class_prototypes, reference, atol=1e-5, rtol=1e-4)
        assert classifier.labels == NAMES
        assert classifier.prototype_metadata["templates"] == list(expected_templates)
    assert len(resolve_templates("ensemble")) == 80
    expected = reference_scores(model, processor, reference, images[:2])
    torch.testing.assert_close(as_matrix(classifier(images[:2], top_k=4), NAMES), expected, atol=1e-5, rtol=1e-4)


def test_zero_shot_argument_errors(tiny_clip_dir):
    with pytest.raises(ValueError, match="placeholder"):
        pipeline("mmft-classification", model=tiny_clip_dir, class_names=NAMES, templates=["no slot"], device="cpu")
    with pytest.raises(ValueError, match="only applies with `class_names"):
        pipeline("mmft-classification", model=tiny_clip_dir, templates="ensemble", device="cpu")
    with pytest.raises(ValueError, match="not both"):
        pipeline(
            "mmft-classification",
            model=tiny_clip_dir,
            class_names=NAMES,
            class_prototypes=torch.eye(4, 16),
            labels=NAMES,
            device="cpu",
        )


@pytest.mark.parametrize("argument", ["dtype", "torch_dtype"])
def test_dtype_and_torch_dtype(classifier_dir, images, argument):
    full = pipeline("mmft-classification", model=classifier_dir, device="cpu")
    half = pipeline("mmft-classification", model=classifier_dir, device="cpu", **{argument: torch.bfloat16})
    assert half.model.dtype == torch.bfloat16
    assert half.class_prototypes.dtype == torch.float32  # similarities stay in fp32
    got, expected = as_matrix(half(images, top_k=4), NAMES), as_matrix(full(images, top_k=4), NAMES)
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0)
    by_string = pipeline("mmft-classification", model=classifier_dir, device="cpu", **{argument: "bfloat16"})
    assert by_string.model.dtype == torch.bfloat16


def test_directory_without_prototypes_explains_how_to_build(tiny_clip_dir):
    with pytest.raises(FileNotFoundError, match="class_prototypes.safetensors") as error:
        pipeline("mmft-classification", model=tiny_clip_dir, device="cpu")
    assert "save_class_prototypes" in str(error.value) and "class_names" in str(error.value)


def test_in_memory_model_without_prototypes(tiny_clip):
    model, processor = tiny_clip
    with pytest.raises(ValueError, match="not loaded from a directory"):
        pipeline("mmft-classification", model=model, processor=processor, device="cpu")
    with pytest.raises(ValueError, match="without `labels`"):
        pipeline("mmft-classification", model=model, processor=processor, class_prototypes=torch.eye(4, 16))
    with pytest.raises(ValueError, match="without `class_prototypes`"):
        pipeline("mmft-classification", model=model, processor=processor, labels=NAMES)


def test_mismatched_counts_dimensions_and_duplicates(tiny_clip, tmp_path):
    model, processor = tiny_clip
    dim = model.config.projection_dim
    common = dict(model=model, processor=processor, device="cpu")
    with pytest.raises(ValueError, match="3 class prototypes but 4 labels"):
        pipeline("mmft-classification", class_prototypes=random_prototypes(3, dim), labels=NAMES, **common)
    with pytest.raises(ValueError, match=f"dimension {dim + 1}.*dimension {dim}"):
        pipeline("mmft-classification", class_prototypes=random_prototypes(4, dim + 1), labels=NAMES, **common)
    with pytest.raises(ValueError, match="Duplicate labels"):
        pipeline("mmft-classification", class_prototypes=random_prototypes(2, dim), labels=["a", "a"], **common)
    with pytest.raises(ValueError, match=r"\[num_classes, dim\]"):
        pipeline("mmft-classification", class_prototypes=torch.ones(dim), labels=["a"], **common)
    # The same checks apply to a prototypes file built with another model.
    save_classifier(model, processor, tmp_path / "other", prototypes=random_prototypes(4, dim * 2))
    with pytest.raises(ValueError, match="another model"):
        pipeline("mmft-classification", model=str(tmp_path / "other"), device="cpu")


def test_prototype_labels_are_authoritative_over_id2label(tiny_clip, tmp_path, caplog):
    model, processor = tiny_clip
    save_classifier(model, processor, tmp_path / "clf")
    save_class_prototypes(random_prototypes(4, 16), list(reversed(NAMES)), str(tmp_path / "clf"))
    with caplog.at_level(logging.WARNING):
        classifier = pipeline("mmft-classification", model=str(tmp_path / "clf"), device="cpu")
    assert classifier.labels == list(reversed(NAMES))
    assert "id2label" in caplog.text


def test_preprocessing_sees_the_training_pixels(classifier_dir, tmp_path):
    """Transparent and 16-bit images: the pipeline's pixels are the training collator's (to_rgb), not convert()."""
    classifier = pipeline("mmft-classification", model=classifier_dir, device="cpu")
    collator = MMFTDataCollator(
        processor=CLIPProcessor.from_pretrained(classifier_dir), class_names=NAMES, train=False
    )
    rgba = np.zeros((20, 24, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:10, :, 3] = 255  # top half opaque red, bottom half transparent (black underneath)
    sixteen = (np.arange(20 * 24, dtype=np.uint16).reshape(20, 24) * 130).astype(np.uint16)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(sixteen).save(tmp_path / "sixteen.png")
    rgba_base64 = base64.b64encode((tmp_path / "rgba.png").read_bytes()).decode()
    cases = {
        "RGBA": (
            Image.fromarray(rgba, "RGBA"),
            [
                Image.fromarray(rgba, "RGBA"),
                tmp_path / "rgba.png",
                rgba,
                rgba_base64,
                f"data:image/png;base64,{rgba_base64}",
            ],
        ),
        "I;16": (Image.fromarray(sixteen), [Image.fromarray(sixteen), str(tmp_path / "sixteen.png")]),
    }
    for mode, (image, inputs) in cases.items():
        assert image.mode == mode
        expected = collator([{"image": image, "label": 0, "captions": ["c"]}])["pixel_values"]
        assert not torch.equal(
            expected, collator.processor.image_processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
        )
        for given in inputs:
            got = classifier.preprocess(given)["pixel_values"]
            assert torch.equal(got, expected), (mode, str(given)[:40])


def test_local_files_only_reaches_the_prototypes_fetch(classifier_dir, monkeypatch):
    calls = []
    original = remote_pipeline.cached_file

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(remote_pipeline, "cached_file", recording)
    classifier = pipeline("mmft-classification", model=classifier_dir, local_files_only=True, device="cpu")
    assert [call["local_files_only"] for call in calls] == [True]
    assert len(classifier(np.zeros((8, 8, 3), np.uint8))) == 4  # not taken for a call argument either
    pipeline("mmft-classification", model=classifier_dir, device="cpu")
    assert calls[-1]["local_files_only"] is False


def test_offline_cache_miss_is_not_reported_as_a_missing_file(tiny_clip, tmp_path, monkeypatch):
    """A Hub repository whose cache lacks the prototypes, with HF_HUB_OFFLINE=1 (set in conftest)."""
    model, processor = tiny_clip
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--me--clf"
    model.save_pretrained(repo / "snapshots" / commit)
    processor.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="not in the local cache") as error:
        pipeline("mmft-classification", model="me/clf", device="cpu")
    assert "No class_prototypes.safetensors in" not in str(error.value)
    save_class_prototypes(random_prototypes(4, 16), NAMES, str(repo / "snapshots" / commit))
    assert pipeline("mmft-classification", model="me/clf", device="cpu").labels == NAMES
