"""Datasets and classifiers served over the Hub's real HTTP API (olah on loopback, see conftest.py): what users
load with `load_dataset("org/name")`, `pipeline(model="org/name", ...)` and `CLIPModel.from_pretrained`.

Each client is a fresh Python process with an empty cache (importing the stack takes most of its time), so one
process with mmft_hf does every library-side check and one without it checks the remote code; both run at once.
"""

import hashlib
import json

import datasets
import pytest
import torch

from mmft_hf.captioning.builder import push_captioned
from mmft_hf.captioning.caption import caption_dataset, caption_provenance
from mmft_hf.classification.pipeline import MMFTClassificationPipeline
from mmft_hf.synthetic import build_clip
from tests.captioning.test_caption import FakeCaptioner

NAMES = ["red circle", "green square", "blue triangle", "yellow cross"]
DATASET_REPO, CLASSIFIER_REPO = "mmft/captioned-textures", "mmft/clip-classifier"

WITH_MMFT_HF = """
import hashlib, json, sys
import datasets
import mmft_hf  # registers "mmft-classification"
from mmft_hf.captioning.caption import caption_provenance
from transformers import CLIPModel, pipeline

dataset_repo, classifier_repo, images = sys.argv[1], sys.argv[2], sys.argv[3:]
loaded = datasets.load_dataset(dataset_repo)
classifier = pipeline("mmft-classification", model=classifier_repo, device="cpu")  # no trust_remote_code
model = CLIPModel.from_pretrained(classifier_repo)
print(json.dumps({
    "dataset": {
        split: {
            "features": part.features.to_dict(),
            "provenance": caption_provenance(part),
            "captions": list(part["captions"]),
            "images": [[i.mode, list(i.size), hashlib.md5(i.tobytes()).hexdigest()] for i in part["image"]],
        }
        for split, part in loaded.items()
    },
    "classifier": type(classifier).__module__ + "." + type(classifier).__name__,
    "outputs": classifier(images, top_k=4),
    "clip_model": type(model).__name__,
    "weights": {name: float(value.double().sum()) for name, value in model.state_dict().items()},
}))
"""

WITHOUT_MMFT_HF = """
import json, sys
try:
    import mmft_hf  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("mmft_hf is importable: the test would prove nothing")
from transformers import pipeline

classifier = pipeline(model=sys.argv[1], trust_remote_code=True, device="cpu")
outputs = classifier(sys.argv[2:], top_k=4)
assert not any(name.startswith("mmft_hf") for name in sys.modules), "mmft_hf was imported"
print(json.dumps({"class": type(classifier).__module__ + "." + type(classifier).__name__, "outputs": outputs}))
"""


def last_json(stdout: str):
    return json.loads(stdout.strip().splitlines()[-1])


def image_digest(image):
    return [image.mode, list(image.size), hashlib.md5(image.tobytes()).hexdigest()]


@pytest.fixture(scope="module")
def published(loopback_hub, image_files_dataset, synthetic_dataset, tiny_tokenizer, tmp_path_factory):
    """A captioned dataset written by `push_captioned` and a classifier written by `clf.save_pretrained`, each
    committed to a git repository olah serves, plus the images to classify."""
    root = tmp_path_factory.mktemp("published")
    source = image_files_dataset.remove_columns("captions")
    train = caption_dataset(
        source.select(range(8)), FakeCaptioner(), domain="textures", cache_dir=root / "c", show_progress=False
    )
    splits = datasets.DatasetDict({"train": train, "test": source.select(range(8, 12))})
    dataset_folder = push_captioned(splits, str(root / "captioned"), source="local/textures", license="cc-by-4.0")
    loopback_hub.commit(dataset_folder, DATASET_REPO, repo_type="dataset")

    torch.manual_seed(0)
    model, processor = build_clip(tiny_tokenizer)
    prototypes = torch.nn.functional.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    classifier = MMFTClassificationPipeline(
        model=model, processor=processor, class_prototypes=prototypes, labels=NAMES, device="cpu"
    )
    classifier.save_pretrained(root / "clf")  # with remote_pipeline.py, config.custom_pipelines and the card
    loopback_hub.commit(root / "clf", CLASSIFIER_REPO)
    images = []
    for index, image in enumerate(synthetic_dataset["test"].select(range(3))["image"]):
        images.append(str(root / f"{index}.png"))
        image.save(images[-1])
    return {"splits": splits, "dataset_folder": dataset_folder, "classifier": classifier, "images": images}


@pytest.fixture(scope="module")
def served(loopback_hub, published):
    """What users get over HTTP: with mmft_hf (every library-side check) and without it (remote code)."""
    images = published["images"]
    with_library = loopback_hub.start(WITH_MMFT_HF, DATASET_REPO, CLASSIFIER_REPO, *images)
    without_library = loopback_hub.start(WITHOUT_MMFT_HF, CLASSIFIER_REPO, *images, block_mmft_hf=True)
    return {**last_json(with_library.result()), "remote": last_json(without_library.result())}


def assert_same_outputs(got, expected):
    assert [[o["label"] for o in out] for out in got] == [[o["label"] for o in out] for out in expected]
    for mine, theirs in zip(got, expected):
        assert [o["score"] for o in mine] == pytest.approx([o["score"] for o in theirs], abs=1e-5)


def test_captioned_dataset_round_trips_through_load_dataset(served, published, tmp_path):
    splits, dataset = published["splits"], served["dataset"]
    local = datasets.load_dataset(published["dataset_folder"], cache_dir=str(tmp_path / "cache"))  # same files
    assert sorted(dataset) == ["test", "train"]
    for split in ("train", "test"):
        assert dataset[split]["features"] == local[split].features.to_dict()
        assert dataset[split]["images"] == [image_digest(image) for image in splits[split]["image"]]
    label = datasets.Features.from_dict(dataset["train"]["features"])["label"]
    assert label.names == splits["train"].features["label"].names
    assert dataset["train"]["captions"] == list(splits["train"]["captions"])
    assert dataset["test"]["captions"] == [[]] * 4
    provenance, original = dataset["train"]["provenance"], caption_provenance(splits["train"])
    for key in ("captioner", "prompt_template", "domain", "caption_types", "captions_per_type"):
        assert provenance[key] == original[key], key
    assert provenance["source"] == "local/textures" and provenance["counts"]["train"]["captions"] == 24


def test_classifier_loads_with_the_library_pipeline_without_remote_code(served, published):
    assert served["classifier"] == "mmft_hf.classification.pipeline.MMFTClassificationPipeline"
    assert_same_outputs(served["outputs"], published["classifier"](published["images"], top_k=4))


def test_classifier_loads_as_a_plain_clip_model(served, published):
    expected = {
        name: float(value.double().sum()) for name, value in published["classifier"].model.state_dict().items()
    }
    assert served["clip_model"] == "CLIPModel" and served["weights"].keys() == expected.keys()
    assert list(served["weights"].values()) == pytest.approx(list(expected.values()), rel=1e-6, abs=1e-6)


def test_classifier_loads_without_mmft_hf_through_remote_code(served, published):
    remote = served["remote"]
    assert remote["class"].startswith("transformers_modules.")
    assert remote["class"].endswith("remote_pipeline.MMFTClassificationPipeline")
    assert_same_outputs(remote["outputs"], published["classifier"](published["images"], top_k=4))
