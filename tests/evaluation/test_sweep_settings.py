"""A results file never mixes cells trained differently: cell settings, their fingerprint, the refusal that lists
the differences, a table rendered from the whole file, and the errors a sweep's flags get."""

import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch

from mmft_hf.captioning.provenance import PROVENANCE_FORMAT, attach_provenance
from mmft_hf.commands import benchmark
from mmft_hf.evaluation import (
    aggregate,
    backbone_settings,
    build_ce_trainer,
    cell_settings,
    dataset_settings,
    parse_method,
    read_results,
    settings_conflicts,
    settings_fingerprint,
)
from mmft_hf.training.arguments import MMFTTrainingArguments
from mmft_hf.version import __version__

SYNTHETIC = ["--synthetic_num_classes", "4", "--synthetic_train_per_class", "8", "--synthetic_eval_per_class", "4"]
QUICK = ["--num_train_epochs", "1", "--learning_rate", "1e-3", "--per_device_train_batch_size", "8",
         "--per_device_eval_batch_size", "64", "--use_cpu", "true", "--disable_tqdm", "true",
         "--save_total_limit", "1", "--report_to", "none"]  # fmt: skip


def arguments(**values) -> MMFTTrainingArguments:
    return MMFTTrainingArguments(**{"output_dir": "unused", "use_cpu": True, "report_to": "none", **values})


def settings(method="mmft", dataset=None, **values) -> dict:
    dataset = dataset or {"num_classes": 4, "class_names_sha256": "abc", "caption_provenance": {"domain": "shapes"}}
    return cell_settings(parse_method(method), arguments(**values), backbone={"backbone": "b"}, dataset=dataset)


def cell(method="mmft", dataset="d", shots=1, seed=1, **values) -> dict:
    return {"dataset": dataset, "method": method, "shots": shots, "seed": seed, "settings": settings(method, **values)}


# ---------------------------------------------------------------------------------------------------- settings
def test_settings_hold_what_changes_a_result_and_nothing_else():
    reference = settings_fingerprint(settings())
    for changed in ({"learning_rate": 1e-3}, {"num_train_epochs": 3}, {"per_device_train_batch_size": 8},
                    {"gradient_accumulation_steps": 2}, {"crop_scale_min": 0.5}, {"fp16": False, "bf16": True},
                    {"weight_decay": 0.1}):  # fmt: skip
        assert settings_fingerprint(settings(**changed)) != reference, changed
    for neutral in ({"output_dir": "elsewhere"}, {"seed": 7}, {"logging_steps": 1}, {"dataloader_num_workers": 2},
                    {"per_device_eval_batch_size": 3}, {"save_total_limit": 5}, {"disable_tqdm": True}):  # fmt: skip
        assert settings_fingerprint(settings(**neutral)) == reference, neutral
    recorded = settings()
    assert recorded["mmft_hf_version"] == __version__ and recorded["world_size"] == 1
    assert recorded["supcon_weight"] == 0.1 and recorded["text_source"] == "captions"  # the method's overrides
    assert settings("flyp")["supcon_weight"] == 0.0 and "caption_provenance" not in settings("flyp")["dataset"]
    assert recorded["dataset"]["caption_provenance"] == {"domain": "shapes"}  # MMFT reads the captions
    # a zero-shot cell trains nothing: the recipe does not change it, the prototypes do
    zeroshot = settings_fingerprint(settings("zeroshot"))
    assert settings_fingerprint(settings("zeroshot", learning_rate=1e-3, num_train_epochs=3)) == zeroshot
    assert settings_fingerprint(settings("zeroshot", class_template="a {}")) != zeroshot
    assert json.loads(json.dumps(recorded)) == recorded  # stored as is in results.jsonl


def test_dataset_settings_read_classes_splits_and_caption_provenance(synthetic_dataset):
    provenance = {"format": PROVENANCE_FORMAT, "captioner": {"model": "gemini"}, "caption_types": ["visual"],
                  "shard": [0, 2], "counts": {"ok": 8}, "mmft_hf_version": "0.0.1"}  # fmt: skip
    captioned = datasets.DatasetDict({**synthetic_dataset, "train": attach_provenance(synthetic_dataset["train"],
                                                                                      provenance)})  # fmt: skip
    facts = dataset_settings(captioned)
    assert facts["num_classes"] == 4 and facts["split_rows"] == {"train": 32, "validation": 16, "test": 16}
    assert facts["splits"] == {"train": "train", "validation": "validation", "test": "test"}
    assert facts["validation_fraction"] is None  # an official validation split: the fraction is unused
    # the shard bookkeeping of a captioning job is not a difference in the captions
    assert facts["caption_provenance"] == {"format": PROVENANCE_FORMAT, "captioner": {"model": "gemini"},
                                           "caption_types": ["visual"]}  # fmt: skip
    other = attach_provenance(synthetic_dataset["train"], {**provenance, "captioner": {"model": "gpt"}, "shard": None})
    assert dataset_settings(datasets.DatasetDict({**synthetic_dataset, "train": other})) != facts
    renamed = synthetic_dataset.cast_column("label", datasets.ClassLabel(names=["a", "b", "c", "d"]))
    assert dataset_settings(renamed)["class_names_sha256"] != facts["class_names_sha256"]
    held_out = dataset_settings(datasets.DatasetDict(train=synthetic_dataset["train"], test=synthetic_dataset["test"]))
    assert held_out["validation_fraction"] == 0.1 and held_out["splits"]["validation"] is None


def test_backbone_is_named_without_local_paths_and_told_apart_by_its_weights(tiny_clip_dir, tmp_path):
    assert backbone_settings("openai/clip-vit-base-patch32") == {"backbone": "openai/clip-vit-base-patch32"}
    assert backbone_settings(None) == {"backbone": "tiny-random-clip"}
    local = backbone_settings(tiny_clip_dir)
    assert local["backbone"] == Path(tiny_clip_dir).name and len(local["backbone_weights_sha256"]) == 16
    copy = tmp_path / "elsewhere" / Path(tiny_clip_dir).name
    shutil.copytree(tiny_clip_dir, copy)
    assert backbone_settings(str(copy)) == local  # the same weights in another folder of the same name
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"!")
    assert backbone_settings(str(copy))["backbone_weights_sha256"] != local["backbone_weights_sha256"]


# --------------------------------------------------------------------------------------------------- conflicts
def test_conflicts_within_a_method_across_methods_and_across_datasets():
    stored = [{**cell(seed=1, learning_rate=1e-5), "accuracy": 0.5}]
    # the same cell again, or another seed of it, with another learning rate: refused, both values listed
    conflicts = settings_conflicts(stored, [cell(seed=2, learning_rate=1e-3)])
    assert list(conflicts) == ["learning_rate"]
    assert conflicts["learning_rate"] == {"1e-05": ["stored: d/mmft/1-shot/seed 1"], "0.001": ["this run"]}
    # another method: the settings that define it may differ, the shared recipe may not
    assert settings_conflicts(stored, [cell("flyp", learning_rate=1e-5)]) == {}
    assert list(settings_conflicts(stored, [cell("flyp", learning_rate=1e-3)])) == ["learning_rate"]
    # another dataset: its own facts are expected to differ
    other_data = {"num_classes": 9, "class_names_sha256": "xyz", "caption_provenance": None}
    other = {**cell(dataset="e"), "settings": settings(dataset=other_data, learning_rate=1e-5)}
    assert settings_conflicts(stored, [other]) == {}
    assert "dataset.num_classes" in settings_conflicts([{**other, "dataset": "d"}], [cell(learning_rate=1e-5)])
    # a zero-shot cell does not depend on the training recipe
    assert settings_conflicts(stored, [cell("zeroshot", shots=0, seed=0, learning_rate=1e-3)]) == {}
    # a record from before fingerprints cannot be vouched for
    legacy = {key: value for key, value in stored[0].items() if key != "settings"}
    assert "settings" in settings_conflicts([legacy], [cell(learning_rate=1e-5)])
    assert settings_conflicts([legacy], [cell("flyp", learning_rate=1e-5)]) == {}


def test_a_cell_recorded_twice_counts_once():
    records = [{"dataset": "d", "method": "m", "shots": 1, "seed": s, "accuracy": a} for s, a in ((1, 0.5), (2, 0.7))]
    stats = aggregate([*records, dict(records[0])])  # files concatenated by hand
    assert stats[("d", "m", "1")]["n"] == 2 and stats[("d", "m", "1")]["mean"] == pytest.approx(60.0)


# ------------------------------------------------------------------------------------------------- end to end
def test_rerun_with_other_settings_refuses_and_the_table_shows_the_whole_file(tiny_clip_dir, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    common = ["--dataset", "synthetic", "--model_name_or_path", tiny_clip_dir, "--output_dir", str(out),
              *SYNTHETIC, *QUICK]  # fmt: skip
    benchmark.main([*common, "--methods", "zeroshot"])
    first = benchmark.main([*common, "--methods", "flyp", "--shots", "1", "--seeds", "1"])
    assert len(first["ran"]) == 1
    # the table and the plot come from the whole file: the zero-shot cell of the earlier invocation is there
    table = (out / "results.md").read_text()
    assert "| zeroshot |" in table and "| flyp |" in table
    lines = (out / "results.jsonl").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a cell ran although the settings differ")

    monkeypatch.setattr(benchmark, "run_cell", no_training)
    # the finished cell with another learning rate, and a new seed of it that would be averaged with it
    for seeds in ("1", "1,2"):
        with pytest.raises(ValueError) as refused:
            benchmark.main([*common, "--methods", "flyp", "--shots", "1", "--seeds", seeds, "--learning_rate", "5e-4"])
        message = str(refused.value)
        assert "holds results trained with other settings" in message and "nothing was run" in message
        # under the command, a setting that is a flag is written as one
        assert (
            "\n  --learning_rate:\n    0.001  (stored: synthetic/flyp/1-shot/seed 1)\n    0.0005  (this run)\n"
            in message
        )
        assert "--output_dir" in message
    assert (out / "results.jsonl").read_text() == lines
    # another backbone (same folder name, other weights) is another model
    other_model = tmp_path / "other" / Path(tiny_clip_dir).name
    shutil.copytree(tiny_clip_dir, other_model)
    weights = other_model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"!")
    with pytest.raises(ValueError, match="backbone_weights_sha256"):
        benchmark.main([*common, "--methods", "zeroshot", "--model_name_or_path", str(other_model)])
    # the same settings: finished cells are reused, nothing runs
    again = benchmark.main([*common, "--methods", "zeroshot,flyp", "--shots", "1", "--seeds", "1"])
    assert again["ran"] == [] and len(again["skipped"]) == 2
    assert len(read_results(str(out / "results.jsonl"))) == 2


# ------------------------------------------------------------------------------------------------- flag errors
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--shots", ""], "--shots '' names no shot count"),
        (["--seeds", " "], "--seeds ' ' names nothing"),
        (["--methods", ","], "--methods ',' names nothing"),
        (["--supcon_weight", "2"], "--supcon_weight must be in"),
        (["--crop_scale_min", "0"], "--crop_scale_min must be in"),
    ],
)
def test_sweep_errors_name_the_flags(flags, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        benchmark.main(["--output_dir", str(tmp_path / "out"), "--use_cpu", "true", *flags])
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_ce_refuses_class_names_that_do_not_fit_the_label_feature(tiny_clip, synthetic_dataset, tmp_path):
    model, processor = tiny_clip
    splits = datasets.DatasetDict(train=synthetic_dataset["train"], validation=synthetic_dataset["validation"],
                                  test=synthetic_dataset["test"])  # fmt: skip
    args = arguments(output_dir=str(tmp_path))
    names = list(synthetic_dataset["train"].features["label"].names)
    for wrong in ([*names, "extra class"], names[:3]):
        with pytest.raises(ValueError, match=f"{len(wrong)} class names for the 4 classes of the label column"):
            build_ce_trainer(model, processor, splits, args, wrong)
    trainer = build_ce_trainer(model, processor, splits, args, names)
    assert trainer.model.head.weight.shape[0] == 4 and not torch.isnan(trainer.model.head.weight).any()
