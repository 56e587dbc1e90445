import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import CLIPModel, pipeline
from transformers.dynamic_module_utils import get_imports

from mmft_hf import publishing
from mmft_hf.classification import remote_pipeline
from mmft_hf.classification.pipeline import MMFTClassificationPipeline
from mmft_hf.classification.prototypes import load_class_prototypes, save_class_prototypes
from mmft_hf.model_card import MMFTModelCardData
from mmft_hf.publishing import publish, save_for_hub
from tests.without_mmft_hf import BLOCK_MMFT_HF

NAMES = ["red circle", "green square", "blue triangle", "yellow cross"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]

# Runs where mmft_hf cannot be imported: a cwd and PYTHONPATH without the repository, and a meta path finder that
# refuses mmft_hf in case an installation (editable finder, .pth) would otherwise provide it.
REMOTE_SCRIPT = BLOCK_MMFT_HF + textwrap.dedent(
    """
    import json

    try:
        import mmft_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("mmft_hf is importable: the test would prove nothing")

    from transformers import pipeline

    model_dir, images = sys.argv[1], sys.argv[2:]
    classifier = pipeline(model=model_dir, trust_remote_code=True, device="cpu")
    outputs = classifier(images, top_k=4, batch_size=2)
    assert not any(name.startswith("mmft_hf") for name in sys.modules), "mmft_hf was imported"
    print(json.dumps({"class": type(classifier).__module__ + "." + type(classifier).__name__, "outputs": outputs}))
    """
)


def random_prototypes(num_classes, dim, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=generator), dim=-1)


@pytest.fixture
def classifier(tiny_clip):
    model, processor = tiny_clip
    return MMFTClassificationPipeline(
        model=model,
        processor=processor,
        class_prototypes=random_prototypes(4, model.config.projection_dim),
        labels=NAMES,
        device="cpu",
    )


@pytest.fixture(scope="module")
def image_paths(synthetic_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-images")
    paths = []
    for index, image in enumerate(synthetic_dataset["test"].select(range(3))["image"]):
        paths.append(str(root / f"{index}.png"))
        image.save(paths[-1])
    return paths


def scores(outputs):
    return [{o["label"]: o["score"] for o in out} for out in outputs]


def assert_same_outputs(got, expected):
    assert [[o["label"] for o in out] for out in got] == [[o["label"] for o in out] for out in expected]
    for a, b in zip(scores(got), scores(expected)):
        assert a == pytest.approx(b, abs=1e-5)


def test_remote_file_imports_only_what_transformers_users_have():
    allowed = {"__future__", "base64", "collections", "copy", "io", "json", "os", "re", "shutil", "urllib"}
    allowed |= {"numpy", "torch", "PIL", "safetensors", "transformers"}
    assert set(get_imports(remote_pipeline.__file__)) <= allowed


def test_save_pretrained_writes_remote_code_and_leaves_model_untouched(classifier, tmp_path):
    config = classifier.model.config
    id2label, label2id = dict(config.id2label), dict(config.label2id)
    assert id2label != dict(enumerate(NAMES))  # the saved config gets the labels, the in-memory one keeps its own
    classifier.save_pretrained(tmp_path / "out")
    assert (config.id2label, config.label2id) == (id2label, label2id)
    files = set(os.listdir(tmp_path / "out"))
    assert {"config.json", "model.safetensors", "remote_pipeline.py", "class_prototypes.safetensors"} <= files
    assert {"processor_config.json", "tokenizer.json"} <= files
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["custom_pipelines"] == {
        remote_pipeline.REMOTE_TASK: {
            "impl": "remote_pipeline.MMFTClassificationPipeline",
            "pt": ["AutoModel"],
            "type": "multimodal",
        }
    }
    assert config["id2label"] == {str(i): name for i, name in enumerate(NAMES)}
    assert not hasattr(classifier.model.config, "custom_pipelines")  # saving restored the in-memory config
    prototypes, labels, _ = load_class_prototypes(str(tmp_path / "out"))  # the library reads the remote format
    assert labels == NAMES
    torch.testing.assert_close(prototypes, classifier.class_prototypes)
    assert (tmp_path / "out" / "remote_pipeline.py").read_bytes() == Path(remote_pipeline.__file__).read_bytes()


def test_remote_code_loads_without_mmft_hf(classifier, tmp_path, image_paths):
    out = tmp_path / "published"
    classifier.save_pretrained(out)
    expected = classifier(image_paths, top_k=4)
    script = tmp_path / "run_remote.py"
    script.write_text(REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(script), str(out), *image_paths],
        cwd=tmp_path,  # not the repository: its root must not be on sys.path
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["class"].startswith("transformers_modules.")
    assert payload["class"].endswith("remote_pipeline.MMFTClassificationPipeline")
    assert_same_outputs(payload["outputs"], expected)


def test_with_mmft_hf_remote_code_dir_and_plain_dir(classifier, tmp_path, image_paths):
    expected = classifier(image_paths, top_k=4)
    classifier.save_pretrained(tmp_path / "remote")
    # The library's task loads the directory without trust_remote_code (tests/classification/test_saving_and_edges.py),
    # and naming the local class explicitly runs no remote code either.
    local = pipeline(
        "mmft-classification",
        model=str(tmp_path / "remote"),
        pipeline_class=MMFTClassificationPipeline,
        device="cpu",
    )
    assert type(local) is MMFTClassificationPipeline
    assert_same_outputs(local(image_paths, top_k=4), expected)
    # remote_code=False: a library checkpoint, plain CLIPModel files, no trust_remote_code needed.
    classifier.save_pretrained(tmp_path / "plain", remote_code=False)
    assert not (tmp_path / "plain" / "remote_pipeline.py").exists()
    assert "custom_pipelines" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    plain = pipeline("mmft-classification", model=str(tmp_path / "plain"), device="cpu")
    assert_same_outputs(plain(image_paths, top_k=4), expected)
    assert isinstance(CLIPModel.from_pretrained(tmp_path / "plain"), CLIPModel)


def test_model_save_pretrained_without_pipeline_code_still_works(tiny_clip, tmp_path, image_paths):
    model, processor = tiny_clip
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    save_class_prototypes(random_prototypes(4, 16), NAMES, str(tmp_path / "ckpt"))
    assert "custom_pipelines" not in json.loads((tmp_path / "ckpt" / "config.json").read_text())
    classifier = pipeline("mmft-classification", model=str(tmp_path / "ckpt"), device="cpu")
    assert len(classifier(image_paths)) == 3


def lora_model(base_dir, seed=0):
    """A LoRA-wrapped CLIP whose adapters are non-zero, so merged and unmerged models differ from the base."""
    model = get_peft_model(
        CLIPModel.from_pretrained(base_dir), LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS)
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model


def test_pipeline_save_pretrained_merges_a_peft_model(tiny_clip_dir, tiny_clip, tmp_path, image_paths):
    _, processor = tiny_clip
    peft_model = lora_model(tiny_clip_dir, seed=3)
    classifier = MMFTClassificationPipeline(
        model=peft_model, processor=processor, class_prototypes=random_prototypes(4, 16), labels=NAMES, device="cpu"
    )
    expected = classifier(image_paths, top_k=4)
    classifier.save_pretrained(tmp_path / "out")
    files = set(os.listdir(tmp_path / "out"))
    assert {"config.json", "model.safetensors", "remote_pipeline.py"} <= files and "adapter_config.json" not in files
    assert classifier.model is peft_model and peft_model.peft_config  # the caller's adapter is not merged away
    loaded = pipeline(
        "mmft-classification", model=str(tmp_path / "out"), pipeline_class=MMFTClassificationPipeline, device="cpu"
    )
    assert type(loaded.model) is CLIPModel
    assert_same_outputs(loaded(image_paths, top_k=4), expected)


def test_save_for_hub_merges_lora_by_default(tiny_clip_dir, tiny_clip, tmp_path, image_paths):
    _, processor = tiny_clip
    peft_model = lora_model(tiny_clip_dir)
    prototypes = random_prototypes(4, 16, seed=1)
    reference = MMFTClassificationPipeline(
        model=peft_model, processor=processor, class_prototypes=prototypes, labels=NAMES, device="cpu"
    )
    base = MMFTClassificationPipeline(
        model=CLIPModel.from_pretrained(tiny_clip_dir),
        processor=processor,
        class_prototypes=prototypes,
        labels=NAMES,
        device="cpu",
    )
    expected = reference(image_paths, top_k=4)
    unadapted = scores(base(image_paths, top_k=4))
    assert max(abs(a[n] - b[n]) for a, b in zip(scores(expected), unadapted) for n in NAMES) > 1e-3  # LoRA matters
    out = save_for_hub(peft_model, processor, prototypes, NAMES, tmp_path / "merged")
    files = set(os.listdir(out))
    assert "adapter_config.json" not in files and "adapter_model.safetensors" not in files
    assert "remote_pipeline.py" in files
    assert isinstance(peft_model, PeftModel) and peft_model.peft_config  # the caller's model is not merged away
    loaded = pipeline("mmft-classification", model=out, pipeline_class=MMFTClassificationPipeline, device="cpu")
    assert type(loaded.model) is CLIPModel
    assert_same_outputs(loaded(image_paths, top_k=4), expected)


def test_save_for_hub_card_describes_what_was_saved(tiny_clip_dir, tiny_clip, tmp_path):
    _, processor = tiny_clip
    peft_model = lora_model(tiny_clip_dir)
    prototypes = random_prototypes(4, 16)
    card = MMFTModelCardData(model_id="me/clf", base_model=tiny_clip_dir, lora={"r": 4}, remote_code=False)
    common = dict(card_data=card, prototype_metadata={"source": "single_template"})
    merged = save_for_hub(peft_model, processor, prototypes, NAMES, tmp_path / "merged", **common)
    text = (Path(merged) / "README.md").read_text()
    assert "| LoRA | yes (r=4, merged=True) |" in text and "standard `CLIPModel`" in text
    assert "trust_remote_code=True" in text  # remote code was written, whatever card_data said
    assert 'the embedding of the prompt "a photo of a {class name}"' in text and "training-caption" not in text
    adapter = save_for_hub(peft_model, processor, prototypes, NAMES, tmp_path / "adapter", merge_lora=False, **common)
    text = (Path(adapter) / "README.md").read_text()
    assert "| LoRA | yes (r=4, merged=False) |" in text and "standard `CLIPModel`" not in text
    assert "PeftModel.from_pretrained" in text and "trust_remote_code" not in text
    for folder in (merged, adapter):  # the local base model is named by its folder, not by this machine's path
        text = (Path(folder) / "README.md").read_text()
        assert tiny_clip_dir not in text and f"base_model: {Path(tiny_clip_dir).name}\n" in text
    assert card.remote_code is False and card.lora == {"r": 4} and card.prototype_source is None  # not modified


def test_save_for_hub_adapter_only(tiny_clip_dir, tiny_clip, tmp_path, image_paths):
    _, processor = tiny_clip
    peft_model = lora_model(tiny_clip_dir, seed=2)
    prototypes = random_prototypes(4, 16, seed=4)
    with pytest.raises(ValueError, match="adapter-only"):
        save_for_hub(peft_model, processor, prototypes, NAMES, tmp_path / "x", merge_lora=False, remote_code=True)
    out = save_for_hub(peft_model, processor, prototypes, NAMES, tmp_path / "adapter", merge_lora=False)
    files = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "class_prototypes.safetensors"} <= files
    assert "model.safetensors" not in files and "remote_pipeline.py" not in files
    reloaded = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_dir), out)
    stored, labels, metadata = load_class_prototypes(out)
    assert metadata["adapter_only"] is True
    classifier = MMFTClassificationPipeline(
        model=reloaded, processor=processor, class_prototypes=stored, labels=labels, device="cpu"
    )
    expected = MMFTClassificationPipeline(
        model=peft_model, processor=processor, class_prototypes=prototypes, labels=NAMES, device="cpu"
    )(image_paths, top_k=4)
    assert_same_outputs(classifier(image_paths, top_k=4), expected)


def test_save_for_hub_plain_model_keeps_training_mode_and_writes_card(tiny_clip, tmp_path):
    model, processor = tiny_clip
    model.train()
    card = MMFTModelCardData(model_id="me/clf", eval_accuracy=0.5, labels=NAMES)
    out = save_for_hub(model, processor, random_prototypes(4, 16), NAMES, tmp_path / "o", card_data=card)
    assert model.training
    assert ModelCard.load(Path(out) / "README.md").data.eval_results[0].metric_value == 0.5
    with pytest.raises(ValueError, match="3 class prototypes but 4 labels"):
        save_for_hub(model, processor, random_prototypes(3, 16), NAMES, tmp_path / "bad")


class FakeHfApi:
    """Stands in for `huggingface_hub.HfApi`: records the calls and the uploaded folder, never reaches a Hub."""

    calls = []
    revisions = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False, token=None):
        FakeHfApi.calls.append(("create_repo", repo_id, private, exist_ok))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_branch(self, repo_id, *, branch, exist_ok=False):
        FakeHfApi.calls.append(("create_branch", repo_id, branch, exist_ok))

    def upload_folder(self, repo_id, folder_path, commit_message, revision=None):
        files = sorted(os.listdir(folder_path))
        config = json.loads(Path(folder_path, "config.json").read_text())
        FakeHfApi.calls.append(("upload_folder", repo_id, files, commit_message, "custom_pipelines" in config))
        FakeHfApi.revisions.append(revision)
        return "commit-info"


def test_publish_uploads_the_saved_folder(tiny_clip, tmp_path, monkeypatch):
    monkeypatch.setattr(publishing, "HfApi", FakeHfApi)
    FakeHfApi.calls, FakeHfApi.revisions = [], []
    model, processor = tiny_clip
    card = MMFTModelCardData(model_id="me/clf", per_class_accuracy={n: 0.25 for n in NAMES}, labels=NAMES)
    result = publish(model, processor, random_prototypes(4, 16), NAMES, "me/clf", card_data=card, private=True)
    assert result == "commit-info"
    assert FakeHfApi.calls[0] == ("create_repo", "me/clf", True, True)
    kind, repo_id, files, message, has_custom = FakeHfApi.calls[1]
    assert (kind, repo_id, message, has_custom) == ("upload_folder", "me/clf", "Upload MMFT classifier", True)
    assert {"README.md", "remote_pipeline.py", "class_prototypes.safetensors", "model.safetensors"} <= set(files)
    assert FakeHfApi.revisions == [None] and len(FakeHfApi.calls) == 2  # no branch to create


def test_publish_to_a_new_branch_with_shards(tiny_clip, monkeypatch):
    monkeypatch.setattr(publishing, "HfApi", FakeHfApi)
    FakeHfApi.calls, FakeHfApi.revisions = [], []
    model, processor = tiny_clip
    publish(model, processor, random_prototypes(4, 16), NAMES, "me/clf", revision="v2", max_shard_size="100KB")
    assert [call[0] for call in FakeHfApi.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert FakeHfApi.calls[1] == ("create_branch", "me/clf", "v2", True)  # exists already: fine
    assert FakeHfApi.revisions == ["v2"]
    files = FakeHfApi.calls[2][2]
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files  # sharded as asked
