import logging
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
    assert "trust_remote_code" not in text and "pipeline_class=MMFTClassificationPipeline" in text


@pytest.mark.parametrize("field", ["eval_accuracy", "per_class_accuracy"])
def test_percentages_are_rejected(field):
    value = 87.5 if field == "eval_accuracy" else {"banded": 87.5}
    with pytest.raises(ValueError, match="fraction"):
        MMFTModelCardData(**{field: value})


def test_packaged_template_is_the_documented_one():
    packaged = (REPO_ROOT / "mmft_hf" / "templates" / "model_card.md").read_bytes()
    assert (REPO_ROOT / "model_cards" / "model_card.md").read_bytes() == packaged  # model_cards/ links to it
    assert model_card.TEMPLATE_PATH.read_bytes() == packaged
