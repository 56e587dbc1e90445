"""Saved classifiers load with the library's pipeline without remote code; pipeline edges (empty input, a string
of class names, score functions) and the model card written by `save_pretrained`/`push_to_hub`."""

import json
import os

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import pipeline

from mmft_hf.classification import pipeline as pipeline_module
from mmft_hf.classification import remote_pipeline
from mmft_hf.classification.pipeline import MMFTClassificationPipeline
from mmft_hf.classification.prototypes import zero_shot_prototypes

NAMES = ["red circle", "green square", "blue triangle", "yellow cross"]


@pytest.fixture
def classifier(tiny_clip):
    model, processor = tiny_clip
    prototypes = torch.nn.functional.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    return MMFTClassificationPipeline(
        model=model, processor=processor, class_prototypes=prototypes, labels=NAMES, device="cpu"
    )


@pytest.fixture(scope="module")
def images(synthetic_dataset):
    return list(synthetic_dataset["test"].select(range(3))["image"])


def test_saved_classifier_loads_with_the_library_without_trust_remote_code(classifier, tmp_path, images):
    classifier.save_pretrained(tmp_path / "clf")
    loaded = pipeline("mmft-classification", model=str(tmp_path / "clf"), device="cpu")  # no trust_remote_code
    assert type(loaded) is MMFTClassificationPipeline  # the library's class, not the repository's file
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert list(config["custom_pipelines"]) == [remote_pipeline.REMOTE_TASK]  # the remote copy is still published
    expected = classifier(images, top_k=4)
    assert [[o["label"] for o in out] for out in loaded(images, top_k=4)] == [
        [o["label"] for o in out] for out in expected
    ]
    # Without a task, transformers still finds the remote copy (and still asks for trust before running it).
    with pytest.raises(ValueError, match="trust_remote_code"):
        pipeline(model=str(tmp_path / "clf"), device="cpu")
    remote = pipeline(model=str(tmp_path / "clf"), trust_remote_code=True, device="cpu")
    assert type(remote).__module__.startswith("transformers_modules.") and remote.task == remote_pipeline.REMOTE_TASK
    for got, want in zip(remote(images, top_k=4), expected):
        assert [o["label"] for o in got] == [o["label"] for o in want]
        assert [o["score"] for o in got] == pytest.approx([o["score"] for o in want], abs=1e-5)


def test_empty_input_gives_empty_output_and_still_checks_arguments(classifier):
    assert classifier([]) == []
    assert classifier([], batch_size=4) == []
    assert classifier(()) == []
    with pytest.raises(ValueError, match="top_k"):
        classifier([], top_k=0)


def test_class_names_string_is_one_class_not_characters(tiny_clip_dir, tiny_clip):
    _, processor = tiny_clip
    one = pipeline("mmft-classification", model=tiny_clip_dir, class_names="red circle", device="cpu")
    assert one.labels == ["red circle"]
    assert one.class_prototypes.shape[0] == 1
    reference = zero_shot_prototypes(one.model, processor.tokenizer, ["red circle"], ("a photo of a {}",))
    torch.testing.assert_close(one.class_prototypes, reference, atol=1e-5, rtol=1e-4)
    for bad in (["cat", ""], ["cat", 3]):
        with pytest.raises(ValueError, match="non-empty strings"):
            pipeline("mmft-classification", model=tiny_clip_dir, class_names=bad, device="cpu")


def test_score_functions_follow_the_logits(classifier, images):
    raw = classifier(images[0], top_k=4, function_to_apply="none")
    logits = torch.tensor([{o["label"]: o["score"] for o in raw}[name] for name in NAMES])
    softmax = {o["label"]: o["score"] for o in classifier(images[0], top_k=4)}
    sigmoid = {o["label"]: o["score"] for o in classifier(images[0], top_k=4, function_to_apply="sigmoid")}
    assert [softmax[name] for name in NAMES] == pytest.approx(logits.softmax(-1).tolist(), abs=1e-6)
    assert [sigmoid[name] for name in NAMES] == pytest.approx(logits.sigmoid().tolist(), abs=1e-6)
    with pytest.raises(ValueError, match="function_to_apply"):
        classifier(images[0], function_to_apply="relu")


def test_save_pretrained_writes_a_model_card(tiny_clip_dir, tmp_path):
    zero_shot = pipeline("mmft-classification", model=tiny_clip_dir, class_names=NAMES, templates="ensemble")
    zero_shot.save_pretrained(tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model is None  # the model came from a local directory: no machine path in the card
    assert tiny_clip_dir not in card.content and str(tmp_path) not in card.content
    assert "80 ImageNet prompts" in card.content  # how the prototypes were built
    assert "trust_remote_code=True" in card.content  # remote code was saved, and the card shows how to use it
    zero_shot.save_pretrained(tmp_path / "plain", remote_code=False)
    assert "trust_remote_code" not in (tmp_path / "plain" / "README.md").read_text()


class RecordingHfApi:
    """Stands in for `huggingface_hub.HfApi` (no Hub upload API on loopback): records the uploaded folder."""

    uploads = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = {name: open(os.path.join(folder_path, name), "rb").read() for name in os.listdir(folder_path)}
        RecordingHfApi.uploads.append((repo_id, files, kwargs))
        return "commit-info"


def test_push_to_hub_uploads_the_model_card_and_the_pipeline_code(classifier, monkeypatch):
    monkeypatch.setattr(pipeline_module, "HfApi", RecordingHfApi)
    RecordingHfApi.uploads = []
    assert classifier.push_to_hub("me/pushed", revision="v1") == "commit-info"
    ((repo_id, files, kwargs),) = RecordingHfApi.uploads
    assert repo_id == "me/pushed" and kwargs["revision"] == "v1"
    assert {"README.md", "remote_pipeline.py", "class_prototypes.safetensors", "config.json"} <= set(files)
    card = files["README.md"].decode()
    assert 'model="me/pushed"' in card and "path/to/this/model" not in card
