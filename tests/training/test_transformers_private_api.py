"""The private `transformers.Trainer` members `MMFTTrainer` overrides or relies on still exist with the parameters
recorded in `TRANSFORMERS_PRIVATE_METHODS` (issue 15 item 6): a transformers release that renames or changes one
fails here, by name, rather than somewhere inside a training run."""

import configparser
import inspect
import re
from pathlib import Path

import pytest
from transformers import Trainer

from mmft_hf import MMFTTrainer
from mmft_hf.training.trainer import (
    TRANSFORMERS_CHECKED,
    TRANSFORMERS_PRIVATE_ATTRIBUTES,
    TRANSFORMERS_PRIVATE_METHODS,
)

SETUP_CFG = Path(__file__).resolve().parents[2] / "setup.cfg"


def parameter_names(function) -> tuple[str, ...]:
    return tuple(inspect.signature(function).parameters)


def test_the_table_was_checked_against_the_supported_floor():
    parser = configparser.ConfigParser()
    parser.read(SETUP_CFG)
    requirement = next(
        line for line in parser["options"]["install_requires"].splitlines() if line.strip().startswith("transformers")
    )
    floor = re.search(r">=\s*([\d.]+)", requirement).group(1)
    assert TRANSFORMERS_CHECKED[0].startswith(floor), (
        f"setup.cfg supports transformers>={floor} but the private-API table was checked against "
        f"{TRANSFORMERS_CHECKED[0]}: re-check the methods against the new floor and update TRANSFORMERS_CHECKED."
    )


@pytest.mark.parametrize("name", sorted(TRANSFORMERS_PRIVATE_METHODS))
def test_private_method_keeps_its_parameters(name):
    method = getattr(Trainer, name, None)
    assert callable(method), f"transformers.Trainer.{name} is gone; MMFTTrainer relies on it."
    assert parameter_names(method) == TRANSFORMERS_PRIVATE_METHODS[name], (
        f"transformers.Trainer.{name} now takes {parameter_names(method)}, recorded "
        f"{TRANSFORMERS_PRIVATE_METHODS[name]}: check MMFTTrainer's use of it."
    )
    if name in vars(MMFTTrainer):  # an override must accept what Trainer passes to it
        assert parameter_names(vars(MMFTTrainer)[name]) == TRANSFORMERS_PRIVATE_METHODS[name]


def test_every_private_override_is_in_the_table():
    overridden = {
        name
        for name, member in vars(MMFTTrainer).items()
        if name.startswith("_") and not name.startswith("__") and callable(member) and hasattr(Trainer, name)
    }
    assert overridden <= set(TRANSFORMERS_PRIVATE_METHODS), overridden - set(TRANSFORMERS_PRIVATE_METHODS)


@pytest.mark.parametrize("name", TRANSFORMERS_PRIVATE_ATTRIBUTES)
def test_private_attribute_is_still_there(name, tiny_clip, synthetic_dataset, tmp_path):
    if name == "current_gradient_accumulation_steps":
        # set by the training loop only; the plain training_step divides the loss by it, as the chunked step does
        assert f"self.{name}" in inspect.getsource(Trainer.training_step)
        return
    if name == "loss_is_scaled_for_ga":
        assert hasattr(Trainer, name) and MMFTTrainer.loss_is_scaled_for_ga is False
        assert "loss_is_scaled_for_ga" in inspect.getsource(Trainer.training_step)
        return
    from mmft_hf import MMFTTrainingArguments

    model, processor = tiny_clip
    args = MMFTTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, eval_strategy="no", save_strategy="no", report_to=[]
    )
    trainer = MMFTTrainer(model=model, args=args, train_dataset=synthetic_dataset["train"], processing_class=processor)
    assert hasattr(trainer, name)
