import configparser
import fnmatch
import importlib.resources
import logging
import os
import re
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from model_card_pattern import MODEL_CARD_PATTERN

from mmft_hf import model_card
from mmft_hf.model_card import PLOT_FILENAME, MMFTModelCardData, create_model_card

REPO_ROOT = Path(__file__).resolve().parents[1]


def full_card_data(**overrides):
    values = dict(
        model_id="me/mmft-dtd",
        base_model="openai/clip-vit-base-patch32",
        dataset_id="mmft/captioned-dtd",
        domain="textures",
        captioner="gemini-2.5-flash-lite",
        caption_prompt="To differentiate this {class_name} photo from other {domain} photos, describe it.",
        caption_types=["visual", "shape", "texture"],
        supcon_weight=0.1,
        num_shots=16,
        seed=1,
        hyperparameters={"learning_rate": 1e-5, "num_train_epochs": 50},
        eval_accuracy=0.7768,
        per_class_accuracy={"dotted": 0.5, "banded": 0.9, "zig|zag": 14 / 15},
        labels=["banded", "dotted", "zig|zag"],
        lora={"r": 4, "lora_alpha": 8, "merged": True},
        prototype_source="captions",
        license="mit",
    )
    values.update(overrides)
    return MMFTModelCardData(**values)


def test_full_card_matches_pattern_and_round_trips(tmp_path):
    card = create_model_card(full_card_data(), tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert MODEL_CARD_PATTERN.match(text), text
    assert card.data.base_model == "openai/clip-vit-base-patch32"  # the returned card is the saved one
    loaded = ModelCard.load(tmp_path / "README.md")
    data = loaded.data
    assert data.base_model == "openai/clip-vit-base-patch32"
    assert data.datasets == ["mmft/captioned-dtd"]
    assert data.pipeline_tag == "zero-shot-image-classification"
    assert {"mmft", "clip", "lora", "few-shot"} <= set(data.tags)
    (result,) = data.eval_results
    assert (result.task_type, result.metric_type, result.metric_value) == ("image-classification", "accuracy", 0.7768)
    assert (result.dataset_type, result.dataset_split) == ("mmft/captioned-dtd", "test")
    assert data.model_name == "me/mmft-dtd"
    per_class_rows = [line for line in text.splitlines() if re.fullmatch(r"\| .+ \| \d+\.\d\d \|", line)]
    assert per_class_rows == ["| banded | 90.00 |", "| dotted | 50.00 |", "| zig\\|zag | 93.33 |"]  # label order


def test_local_paths_become_folder_names_and_cache_snapshots_hub_ids(tmp_path, monkeypatch):
    """A card names no absolute path of the machine that trained: a local checkpoint or dataset is named by its
    folder (no Hub link), a snapshot of the Hub cache by its Hub id (linked)."""
    checkpoint = tmp_path / "runs" / "my-clip"
    checkpoint.mkdir(parents=True)
    dataset = tmp_path / "captioned-shapes"
    dataset.mkdir()
    out = tmp_path / "card"
    create_model_card(full_card_data(base_model=str(checkpoint), dataset_id=str(dataset), lora=None), out)
    text = (out / "README.md").read_text()
    assert str(tmp_path) not in text
    data = ModelCard.load(out / "README.md").data
    assert data.base_model == "my-clip" and data.datasets == ["captioned-shapes"]
    assert data.eval_results[0].dataset_type == "captioned-shapes"
    assert "starting from the local checkpoint `my-clip`, trained on the local dataset `captioned-shapes`." in text
    assert "huggingface.co/my-clip" not in text and "huggingface.co/datasets/captioned-shapes" not in text
    # a relative path that exists is local too (run from its parent folder)
    monkeypatch.chdir(checkpoint.parent)
    assert model_card.portable_reference("my-clip") == ("my-clip", False)
    assert model_card.portable_reference("./my-clip/") == ("my-clip", False)

    snapshot = tmp_path / "hub" / "models--openai--clip-vit-base-patch32" / "snapshots" / "3d74acf9a28c67741b2f4f"
    cached = tmp_path / "hub" / "datasets--mmft--captioned-dtd" / "snapshots" / "0123abcd"
    create_model_card(full_card_data(base_model=str(snapshot), dataset_id=str(cached)), out)
    assert MODEL_CARD_PATTERN.match((out / "README.md").read_text())  # exactly the card of the Hub ids
    assert model_card.portable_reference("openai/clip-vit-base-patch32") == ("openai/clip-vit-base-patch32", True)
    assert model_card.portable_reference(None) == (None, False)


def test_adapter_card_names_a_local_base_model_by_its_folder(tmp_path):
    base = tmp_path / "base-clip"
    base.mkdir()
    create_model_card(full_card_data(base_model=str(base), lora={"r": 4, "merged": False}), tmp_path / "card")
    text = (tmp_path / "card" / "README.md").read_text()
    assert str(tmp_path) not in text
    assert 'CLIPModel.from_pretrained("base-clip")' in text and "([`base-clip`]" not in text


def test_per_class_chart_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    create_model_card(full_card_data(), tmp_path)
    assert (tmp_path / PLOT_FILENAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_card_has_no_picture(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with caplog.at_level(logging.INFO, logger=model_card.__name__):
        create_model_card(full_card_data(), tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert not (tmp_path / PLOT_FILENAME).exists()
    assert PLOT_FILENAME not in text and "| banded | 90.00 |" in text
    assert "matplotlib is not installed" in caplog.text


def test_minimal_card_has_no_model_index(tmp_path):
    create_model_card(MMFTModelCardData(), tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "model-index" not in text and "No evaluation accuracy was recorded." in text
    assert "### Per-class accuracy" not in text and not (tmp_path / PLOT_FILENAME).exists()
    assert "| LoRA | no (full fine-tuning) |" in text and "| Shots per class | all (full data) |" in text
    assert 'model="path/to/this/model"' in text
    data = ModelCard.load(tmp_path / "README.md").data
    assert data.eval_results is None and data.pipeline_tag == "zero-shot-image-classification"
    assert "few-shot" not in data.tags and "lora" not in data.tags


def test_without_remote_code_only_the_mmft_snippet(tmp_path):
    create_model_card(full_card_data(remote_code=False), tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "trust_remote_code" not in text and 'pipeline("mmft-classification", model="me/mmft-dtd")' in text
    assert "pipeline_class" not in text  # with mmft_hf installed the registered task loads the repository


@pytest.mark.parametrize("source", ["single_template", "ensemble", None])
def test_prototype_sentences_follow_the_prototype_source(tmp_path, source):
    create_model_card(full_card_data(prototype_source=source), tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "training-caption" not in text and "captions' embeddings" not in text
    assert model_card.PROTOTYPE_DESCRIPTIONS[source] in text
    create_model_card(full_card_data(), tmp_path)  # "captions"
    text = (tmp_path / "README.md").read_text()
    assert "training-caption embeddings" in text and "averages of the *training* captions' embeddings" in text


def test_adapter_only_card_does_not_claim_a_standard_clip_model(tmp_path):
    create_model_card(full_card_data(lora={"r": 4, "merged": False}, remote_code=False), tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "standard `CLIPModel`" not in text and 'CLIPModel.from_pretrained("me/mmft-dtd")' not in text
    assert 'PeftModel.from_pretrained(CLIPModel.from_pretrained("openai/clip-vit-base-patch32"), directory)' in text
    assert "| LoRA | yes (r=4, merged=False) |" in text
    create_model_card(full_card_data(), tmp_path)  # merged
    assert "standard `CLIPModel`" in (tmp_path / "README.md").read_text()


def test_card_names_the_class_the_checkpoint_loads_with(tmp_path):
    create_model_card(full_card_data(model_class="SiglipModel"), tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "standard `SiglipModel`" in text and 'SiglipModel.from_pretrained("me/mmft-dtd")' in text
    assert "CLIPModel" not in text
    create_model_card(full_card_data(model_class="SiglipModel", lora={"r": 4, "merged": False}), tmp_path)
    assert "PeftModel.from_pretrained(SiglipModel.from_pretrained(" in (tmp_path / "README.md").read_text()


def test_unknown_prototype_source_is_rejected():
    with pytest.raises(ValueError, match="prototype_source"):
        MMFTModelCardData(prototype_source="caption")


@pytest.mark.parametrize(
    "field", ["eval_accuracy", "per_class_accuracy", "retention_accuracy_before", "retention_accuracy_after",
              "wise_ft_curve"]
)  # fmt: skip
def test_percentages_are_rejected(field):
    values = {"per_class_accuracy": {"banded": 87.5}, "wise_ft_curve": [{"alpha": 0.5, "validation_accuracy": 87.5}]}
    with pytest.raises(ValueError, match="fraction"):
        MMFTModelCardData(**{field: values.get(field, 87.5)})


def test_wise_ft_and_retention_sections(tmp_path):
    curve = [{"alpha": a, "validation_accuracy": v, "test_accuracy": t, "retention_accuracy": r}
             for a, v, t, r in ((0.0, 0.5, 0.4, 0.6), (0.5, 0.7, 0.65, 0.55), (1.0, 0.6, 0.7, 0.3))]  # fmt: skip
    data = MMFTModelCardData(wise_ft_alpha=0.5, wise_ft_curve=curve, wise_ft_plot="wise_ft_curve.png",
                             retention_dataset="org/other", retention_accuracy_before=0.6,
                             retention_accuracy_after=0.55)  # fmt: skip
    text = create_model_card(data, tmp_path).text
    assert "**α = 0.5**, the best of the α below on validation accuracy" in text
    assert "| alpha | validation (%) | test (%) | zero-shot on org/other (%) |\n|---|---|---|---|\n" in text
    assert "| 0.5 | 70.00 | 65.00 | 55.00 |" in text and "![WiSE-FT curve](wise_ft_curve.png)" in text
    assert "**60.00 %** before fine-tuning, **55.00 %** for this model." in text
    plain = create_model_card(MMFTModelCardData(), tmp_path / "plain").text
    assert "WiSE-FT" not in plain and "retention" not in plain
    with pytest.raises(ValueError, match="wise_ft_alpha = 1.5"):
        MMFTModelCardData(wise_ft_alpha=1.5)


def test_packaged_template_is_the_documented_one():
    documented = REPO_ROOT / "model_cards" / "model_card.md"
    assert os.readlink(documented) == "../mmft_hf/templates/model_card.md"  # a link to the packaged file, no copy
    package_data = configparser.ConfigParser()
    package_data.read(REPO_ROOT / "setup.cfg")
    patterns = package_data["options.package_data"]["mmft_hf"].split()
    assert any(fnmatch.fnmatch("templates/model_card.md", pattern) for pattern in patterns)  # shipped in wheels
    packaged = importlib.resources.files("mmft_hf") / "templates" / "model_card.md"
    assert packaged.is_file()
    assert Path(os.fspath(packaged)).resolve() == model_card.TEMPLATE_PATH.resolve() == documented.resolve()
