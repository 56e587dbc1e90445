"""The evaluation harness: protocol splits, methods, one cell, resumable end-to-end runs, aggregation and DDP."""

import json
import math
import statistics
from pathlib import Path

import datasets
import pytest
import torch
from conftest import run_torchrun

from mmft_hf import evaluation
from mmft_hf.captioning.provenance import PROVENANCE_FORMAT, attach_provenance, caption_provenance
from mmft_hf.classification.prototypes import OPENAI_IMAGENET_TEMPLATES, zero_shot_prototypes
from mmft_hf.commands import benchmark as benchmark_command
from mmft_hf.evaluation import (
    LOW_SEED_MARK,
    ZeroShotLinearClassifier,
    aggregate,
    build_ce_trainer,
    ce_baseline,
    load_benchmark_splits,
    parse_method,
    parse_shots,
    plan_cells,
    read_results,
    render_table,
    run_cell,
    select_caption_types,
)
from mmft_hf.training.arguments import MMFTTrainingArguments
from mmft_hf.training.data import to_rgb
from mmft_hf.training.trainer import MMFTTrainer

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "benchmark.py"
REPORT_PROCESS_GROUP = REPO / "tests" / "scripts" / "report_process_group.py"
# the synthetic dataset the `synthetic_dataset` fixture (and so `tiny_clip_dir`'s vocabulary) is made of
SYNTHETIC_FLAGS = [
    "--synthetic_num_classes",
    "4",
    "--synthetic_train_per_class",
    "8",
    "--synthetic_eval_per_class",
    "4",
]
QUICK_FLAGS = ["--num_train_epochs", "1", "--learning_rate", "1e-3", "--per_device_train_batch_size", "8",
               "--per_device_eval_batch_size", "64", "--use_cpu", "true", "--disable_tqdm", "true",
               "--save_total_limit", "1", "--report_to", "none"]  # fmt: skip


def load_benchmark_script():
    return benchmark_command


def quick_args(tmp_path, **overrides) -> MMFTTrainingArguments:
    values = dict(
        output_dir=str(tmp_path / "cell"),
        num_train_epochs=1,
        learning_rate=1e-3,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=64,
        use_cpu=True,
        disable_tqdm=True,
        save_total_limit=1,
        report_to="none",
        seed=1,
    )
    values.update(overrides)
    return MMFTTrainingArguments(**values)


# ------------------------------------------------------------------------------------------- methods and cells
def test_methods_set_what_defines_them():
    assert (
        parse_method("zeroshot").kind == "zeroshot" and parse_method("zeroshot").prototype_source == "single_template"
    )
    assert parse_method("zeroshot_ensemble").prototype_source == "ensemble"
    flyp = parse_method("flyp")
    assert flyp.overrides == {"text_source": "class_name", "supcon_weight": 0.0, "prototype_source": "single_template"}
    assert parse_method("mmft").overrides == {"text_source": "captions", "supcon_weight": 0.1}
    assert parse_method("ce").kind == "ce"
    ablation = parse_method("mmft-w0.5-typesshape+texture-notemplate-infersingle_template")
    assert ablation.overrides == {
        "text_source": "captions",
        "supcon_weight": 0.5,
        "class_template": None,
        "prototype_source": "single_template",
    }
    assert ablation.caption_types == ("shape", "texture") and ablation.name.startswith("mmft-w0.5")
    for bad in ("mfmt", "mmft-w2", "mmft-colour", "flyp-w0.5", "mmft-inferbest"):
        with pytest.raises(ValueError, match="mmft-<option>|must be in"):
            parse_method(bad)
    # malformed caption types fail when the method is parsed, before any cell runs
    with pytest.raises(ValueError, match="'mmft-typesshape\\+shape': caption_types has duplicates"):
        parse_method("mmft-typesshape+shape")
    with pytest.raises(ValueError, match="Invalid caption type ''"):
        parse_method("mmft-typesshape+")
    assert parse_shots("1, 2,16,full") == [1, 2, 16, "full"]
    for bad in ("0", "-1", "1,x"):
        with pytest.raises(ValueError, match="--shots .*positive integers or .full."):
            parse_shots(bad)


def test_plan_runs_zero_shot_once_and_trained_methods_per_shot_and_seed():
    cells = plan_cells(["a", "b"], ["zeroshot", "mmft"], [1, "full"], [1, 2, 3])
    assert len(cells) == 2 * (1 + 2 * 3)
    assert {"dataset": "a", "method": "zeroshot", "shots": 0, "seed": 0} in cells
    assert sum(c["method"] == "mmft" and c["shots"] == "full" for c in cells) == 6


# ------------------------------------------------------------------------------------------------------ splits
def test_splits_follow_the_protocol(synthetic_dataset):
    splits, protocol = load_benchmark_splits(synthetic_dataset, shots=2, seed=1)
    assert protocol == "official validation split"
    assert len(splits["train"]) == 2 * 4 and sorted(splits["train"]["label"]) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len(splits["validation"]) == len(synthetic_dataset["validation"])  # validation is never reduced
    assert list(splits["test"]["label"]) == list(synthetic_dataset["test"]["label"])

    train = synthetic_dataset["train"].add_column("row", list(range(len(synthetic_dataset["train"]))))
    no_validation = datasets.DatasetDict({"train": train, "test": synthetic_dataset["test"]})
    full, protocol = load_benchmark_splits(no_validation, shots="full", seed=3, validation_fraction=0.25)
    assert protocol == "seeded 75/25 train/validation split"
    assert (len(full["train"]), len(full["validation"])) == (24, 8)
    assert sorted(list(full["train"]["row"]) + list(full["validation"]["row"])) == list(range(32))
    again, _ = load_benchmark_splits(no_validation, shots="full", seed=3, validation_fraction=0.25)
    other, _ = load_benchmark_splits(no_validation, shots="full", seed=4, validation_fraction=0.25)
    assert list(again["validation"]["row"]) == list(full["validation"]["row"])  # seeded
    assert list(other["validation"]["row"]) != list(full["validation"]["row"])
    # few-shot rows come from the training part only, never from the held-out validation rows
    few, _ = load_benchmark_splits(no_validation, shots=4, seed=3, validation_fraction=0.25)
    assert list(few["validation"]["row"]) == list(full["validation"]["row"])  # not reduced
    assert len(few["train"]) == 16 and set(list(few["train"]["row"])) <= set(list(full["train"]["row"]))

    with pytest.raises(ValueError, match="test split 'test' is not in the dataset"):
        load_benchmark_splits(datasets.DatasetDict({"train": synthetic_dataset["train"]}), shots=1, seed=1)
    # a named validation split must exist; only the default falls back to a hold-out of train
    with pytest.raises(ValueError, match="validation split 'validation' is not in the dataset"):
        load_benchmark_splits(no_validation, shots=1, seed=1, validation_split="validation")
    # no test split asked for: none returned
    untested, protocol = load_benchmark_splits(synthetic_dataset, shots=1, seed=1, test_split=None)
    assert list(untested) == ["train", "validation"] and protocol == "official validation split"
    # "validation" as the test split (Food-101's layout) is not also used as the validation split
    food = datasets.DatasetDict({"train": train, "validation": synthetic_dataset["test"]})
    _, protocol = load_benchmark_splits(food, shots=1, seed=1, test_split="validation")
    assert protocol == "seeded 90/10 train/validation split"


def test_select_caption_types_keeps_type_major_slots(synthetic_dataset):
    train = synthetic_dataset["train"].select(range(3))
    rows = [list(c) for c in train["captions"]]
    rows[2] = rows[2][:2]  # an incomplete row cannot be attributed to types
    train = train.remove_columns("captions").add_column("captions", rows)
    kept = select_caption_types(train, ["shape", "texture"])
    assert list(kept["captions"]) == [rows[0][1:], rows[1][1:], []]
    assert list(select_caption_types(train, ["visual"])["captions"])[:2] == [[rows[0][0]], [rows[1][0]]]
    with pytest.raises(ValueError, match="not in this dataset's types"):
        select_caption_types(train, ["petals"])


def test_selected_caption_types_update_the_provenance(synthetic_dataset):
    provenance = {"format": PROVENANCE_FORMAT, "caption_types": ["visual", "shape", "texture"],
                  "captions_per_type": 1, "domain": "shapes"}  # fmt: skip
    train = attach_provenance(synthetic_dataset["train"].select(range(4)), provenance)
    kept = select_caption_types(train, ["texture", "shape"])
    assert caption_provenance(kept) == {**provenance, "caption_types": ["shape", "texture"]}  # stored order
    assert caption_provenance(train) == provenance  # the input keeps its own


# ---------------------------------------------------------------------------------------------- CE classifier
def test_ce_head_starts_as_the_ensemble_zero_shot_classifier(tiny_clip, synthetic_dataset):
    model, processor = tiny_clip
    names = synthetic_dataset["train"].features["label"].names
    prototypes = zero_shot_prototypes(model, processor.tokenizer, names, OPENAI_IMAGENET_TEMPLATES)
    classifier = ZeroShotLinearClassifier(model, prototypes)
    pixel_values = processor.image_processor(images=list(synthetic_dataset["test"]["image"]), return_tensors="pt")[
        "pixel_values"
    ]
    labels = torch.tensor(list(synthetic_dataset["test"]["label"]))
    with torch.no_grad():
        outputs = classifier(pixel_values, labels=labels)
        image = torch.nn.functional.normalize(
            model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1
        )
        expected = model.logit_scale.exp() * image @ prototypes.T
    torch.testing.assert_close(outputs["logits"], expected)
    torch.testing.assert_close(outputs["loss"], torch.nn.functional.cross_entropy(expected, labels))
    assert not any("text" in name for name, _ in classifier.named_parameters())  # no unused params under DDP


def with_class_names(dataset: datasets.Dataset, names: list[str]) -> datasets.Dataset:
    return dataset.cast_column("label", datasets.ClassLabel(names=names))


def test_ce_head_starts_from_the_trainers_ensemble_classifier_with_normalised_names(
    tiny_clip, synthetic_dataset, tmp_path
):
    """MMFTTrainer builds its texts from normalised class names; the CE head must start from the same classifier
    as the `zeroshot_ensemble` method, not from prototypes of the raw names."""
    model, processor = tiny_clip
    names = ["Foo_Bar", "001.Baz-Qux", "Red_Circle", "blue-triangle"]
    split = with_class_names(synthetic_dataset["validation"], names)
    zeroshot_args = quick_args(tmp_path, text_source="class_name", prototype_source="ensemble")
    zeroshot = MMFTTrainer(
        model=model, args=zeroshot_args, eval_dataset=split, prototype_dataset=split, processing_class=processor
    )
    expected = model.logit_scale.exp().detach() * zeroshot.compute_class_prototypes()
    trainer = build_ce_trainer(model, processor, datasets.DatasetDict(train=split, validation=split, test=split),
                               quick_args(tmp_path), names)  # fmt: skip
    torch.testing.assert_close(trainer.model.head.weight.detach(), expected)
    # negative control: prototypes of the raw names are another classifier
    raw = model.logit_scale.exp().detach() * zero_shot_prototypes(
        model, processor.tokenizer, names, OPENAI_IMAGENET_TEMPLATES
    )
    assert (raw - expected).abs().max() > 1e-3


@pytest.mark.parametrize("decay_all", [True, False])
def test_ce_baseline_follows_weight_decay_all_parameters(decay_all, tiny_clip, synthetic_dataset, tmp_path):
    model, processor = tiny_clip
    splits = datasets.DatasetDict(train=synthetic_dataset["train"], validation=synthetic_dataset["validation"],
                                  test=synthetic_dataset["test"])  # fmt: skip
    args = quick_args(tmp_path, weight_decay=0.1, weight_decay_all_parameters=decay_all)
    trainer = build_ce_trainer(model, processor, splits, args, synthetic_dataset["train"].features["label"].names)
    optimizer = trainer.create_optimizer()
    undecayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] == 0 for p in group["params"]}
    names = {id(p): name for name, p in trainer.model.named_parameters()}
    undecayed = sorted(names[key] for key in undecayed)
    if decay_all:  # biases and LayerNorm weights too, as in MMFTTrainer
        assert undecayed == []
    else:
        assert "head.bias" in undecayed and not any(name.endswith("fc1.weight") for name in undecayed)


def test_ce_baseline_refuses_lora(tiny_clip, synthetic_dataset, tmp_path):
    model, processor = tiny_clip
    splits = datasets.DatasetDict(train=synthetic_dataset["train"], validation=synthetic_dataset["validation"],
                                  test=synthetic_dataset["test"])  # fmt: skip
    with pytest.raises(ValueError, match="'ce' does not support --use_lora"):
        build_ce_trainer(model, processor, splits, quick_args(tmp_path, use_lora=True), ["a", "b", "c", "d"])
    benchmark = load_benchmark_script()
    with pytest.raises(ValueError, match="'ce' does not support --use_lora"):  # before any cell runs
        benchmark.main(["--methods", "zeroshot,ce", "--use_lora", "true", "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_ce_images_go_through_the_mmft_collator(tiny_clip, image_files_dataset, tmp_path):
    """CE batches come from `MMFTDataCollator`: a corrupt file names its row; evaluation has no random crop."""
    model, processor = tiny_clip
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    row = {"image": [str(bad)], "label": [1], "captions": [["a broken file"]]}
    broken = datasets.concatenate_datasets(
        [image_files_dataset, datasets.Dataset.from_dict(row, features=image_files_dataset.features)]
    )
    splits = datasets.DatasetDict(train=broken, validation=image_files_dataset, test=image_files_dataset)
    args = quick_args(tmp_path, per_device_train_batch_size=len(broken), per_device_eval_batch_size=4)
    trainer = build_ce_trainer(model, processor, splits, args, image_files_dataset.features["label"].names)
    with pytest.raises(ValueError, match=r"Row 12: the image .*bad\.png.* cannot be read") as error:
        next(iter(trainer.get_train_dataloader()))
    assert "__mmft_row__" not in str(error.value)  # no internal column name in the message
    first, second = (next(iter(trainer.get_eval_dataloader())) for _ in range(2))
    torch.testing.assert_close(first["pixel_values"], second["pixel_values"])
    assert sorted(first) == ["labels", "pixel_values"]
    images = [to_rgb(image) for image in image_files_dataset.select(range(4))["image"]]
    expected = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(first["pixel_values"], expected)


# ------------------------------------------------------------------------------------------------- selection
@pytest.mark.parametrize("method", ["mmft", "ce"])
def test_selection_uses_validation_and_test_is_evaluated_once_at_the_end(
    method, tiny_clip, synthetic_dataset, tmp_path, monkeypatch
):
    """Every evaluation during training sees the validation split (16 rows); the test split (12 rows here, so it
    is told apart) is evaluated exactly once, last. Shuffling the test labels changes nothing about selection."""
    calls = []
    for cls in (MMFTTrainer, ce_baseline.Trainer):
        original = cls.evaluate

        def spy(self, eval_dataset=None, *args, _original=original, **kwargs):
            dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
            calls.append((kwargs.get("metric_key_prefix", "eval"), len(dataset)))
            return _original(self, eval_dataset, *args, **kwargs)

        monkeypatch.setattr(cls, "evaluate", spy)
    model, processor = tiny_clip
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def load_model():
        model.load_state_dict(state)
        return model, processor

    test = synthetic_dataset["test"].select(range(12))
    records = []
    for test_labels in (list(test["label"]), list(reversed(test["label"]))):
        calls.clear()
        splits = datasets.DatasetDict(
            train=synthetic_dataset["train"],
            validation=synthetic_dataset["validation"],
            test=test.remove_columns("label").add_column("label", test_labels, feature=test.features["label"]),
        )
        args = quick_args(tmp_path, num_train_epochs=3, output_dir=str(tmp_path / f"cell{len(records)}"))
        records.append(
            run_cell(
                splits,
                parse_method(method),
                args,
                load_model,
                dataset="s",
                shots="full",
                seed=1,
                protocol="official validation split",
                backbone="tiny",
            )  # fmt: skip
        )
        assert calls == [("eval", 16)] * 3 + [("test", 12)], calls
        assert not list((tmp_path / f"cell{len(records) - 1}").glob("checkpoint-*"))  # deleted after the cell
    first, second = records
    assert first["train_steps"] == second["train_steps"] == 12
    assert first["best_step"] == second["best_step"] and first["best_step"] in (4, 8, 12)
    assert first["validation_accuracy"] == second["validation_accuracy"]


@pytest.mark.parametrize("method", ["mmft", "ce"])
def test_cell_checkpoints_hold_the_model_only(method, tiny_clip, synthetic_dataset, tmp_path):
    """A cell never resumes: its kept checkpoints have no optimizer, scheduler or RNG state."""
    model, processor = tiny_clip
    splits = datasets.DatasetDict(train=synthetic_dataset["train"], validation=synthetic_dataset["validation"],
                                  test=synthetic_dataset["test"])  # fmt: skip
    args = quick_args(tmp_path, num_train_epochs=2, save_total_limit=None)
    record = run_cell(splits, parse_method(method), args, lambda: (model, processor), dataset="s", shots="full",
                      seed=1, protocol="p", backbone="tiny", keep_checkpoints=True)  # fmt: skip
    checkpoints = sorted((tmp_path / "cell").glob("checkpoint-*"))
    assert [path.name for path in checkpoints] == ["checkpoint-4", "checkpoint-8"]
    assert record["best_step"] in (4, 8)
    for checkpoint in checkpoints:
        files = {path.name for path in checkpoint.iterdir()}
        assert "model.safetensors" in files and "trainer_state.json" in files
        assert not files & {"optimizer.pt", "scheduler.pt", "rng_state.pth"}, files


def test_zero_shot_cell_leaves_the_captions_unread(tiny_clip, synthetic_dataset, tmp_path):
    """Template prototypes need only the class names: an unusable caption column does not matter."""
    model, processor = tiny_clip
    train = synthetic_dataset["train"]
    captions = [None, *train["captions"][1:]]  # validating the captions would reject row 0
    train = train.remove_columns("captions").add_column("captions", captions, feature=train.features["captions"])
    splits = datasets.DatasetDict(train=train, validation=synthetic_dataset["validation"],
                                  test=synthetic_dataset["test"])  # fmt: skip
    record = run_cell(splits, parse_method("zeroshot_ensemble"), quick_args(tmp_path), lambda: (model, processor),
                      dataset="s", shots=0, seed=0, protocol="p", backbone="tiny")  # fmt: skip
    assert record["test_samples"] == 16 and 0.0 <= record["accuracy"] <= 1.0


# ----------------------------------------------------------------------------------------------- aggregation
def test_aggregation_matches_an_independent_computation_and_marks_low_seed_cells():
    accuracies = {("d1", "mmft", 1): [0.5, 0.6, 0.7], ("d1", "mmft", 2): [0.75, 0.8], ("d1", "flyp", 1): [0.4],
                  ("d2", "mmft", 1): [0.2, 0.3, 0.1], ("d1", "zeroshot", 0): [0.33]}  # fmt: skip
    records = [
        {"dataset": d, "method": m, "shots": k, "seed": seed, "accuracy": a, "backbone": "b"}
        for (d, m, k), values in accuracies.items()
        for seed, a in enumerate(values, 1)
    ]
    stats = aggregate(records)
    for (d, m, k), values in accuracies.items():
        percent = [100 * v for v in values]
        stat = stats[(d, m, str(k))]
        assert stat["n"] == len(values) and math.isclose(stat["mean"], statistics.fmean(percent))
        if len(values) > 1:
            assert math.isclose(stat["se"], statistics.stdev(percent) / math.sqrt(len(values)))
        else:
            assert stat["se"] is None
    assert math.isclose(stats[("d1", "mmft", "1")]["se"], 10 / math.sqrt(3))

    table = render_table([r for r in records if r["dataset"] == "d1"])
    lines = table.splitlines()
    assert "| method | 0-shot | 1-shot | 2-shot |" in lines
    assert "| mmft |  | 60.00 ± 5.77 | 77.50 ± 2.50† |" in lines
    assert f"| flyp |  | 40.00{LOW_SEED_MARK} |  |" in lines
    assert "| zeroshot | 33.00 |  |  |" in lines  # one deterministic run: not marked
    assert "Average" not in table

    several = render_table(records).splitlines()
    assert "| method | d1 | d2 | Average |" in several
    assert "| mmft | 60.00 ± 5.77 | 20.00 ± 5.77 | 40.00 |" in several  # mean of the per-dataset means
    assert f"| flyp | 40.00{LOW_SEED_MARK} |  |  |" in several  # no average without every dataset


# ---------------------------------------------------------------------------------------------- end to end
def test_end_to_end_synthetic_run_is_resumable(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    benchmark = load_benchmark_script()
    out = tmp_path / "results"
    argv = ["--dataset", "synthetic", "--methods", "zeroshot,ce,mmft", "--shots", "1,2", "--seeds", "1",
            "--model_name_or_path", tiny_clip_dir, "--output_dir", str(out),
            *SYNTHETIC_FLAGS, *QUICK_FLAGS]  # fmt: skip
    summary = benchmark.main(argv)
    assert len(summary["ran"]) == 5 and summary["skipped"] == []
    lines = (out / "results.jsonl").read_text().splitlines()
    assert tiny_clip_dir not in "".join(lines) and str(tmp_path) not in "".join(lines)
    records = [json.loads(line) for line in lines]
    assert len(records) == 5
    assert {(r["method"], r["shots"], r["seed"]) for r in records} == {
        ("zeroshot", 0, 0), ("ce", 1, 1), ("ce", 2, 1), ("mmft", 1, 1), ("mmft", 2, 1)}  # fmt: skip
    for record in records:
        # the model is named by its folder (no path of this machine in the file), its weights by their hash
        assert record["dataset"] == "synthetic" and record["backbone"] == Path(tiny_clip_dir).name
        assert record["settings"]["backbone_weights_sha256"] and len(record["fingerprint"]) == 16
        assert 0.0 <= record["accuracy"] <= 1.0 and record["test_samples"] == 16
        assert record["wall_time_s"] > 0 and record["peak_memory_mib"] > 0
        assert record["protocol"] == "official validation split" and record["world_size"] == 1
        trained = record["method"] != "zeroshot"
        assert record["train_samples"] == 4 * record["shots"] * trained
        assert (record["train_steps"] > 0) == trained and (record["best_step"] is not None) == trained
    assert not list(out.glob("runs/**/checkpoint-*"))
    table = (out / "results.md").read_text()
    assert "| method | 0-shot | 1-shot | 2-shot |" in table
    by_cell = {(r["method"], r["shots"]): 100 * r["accuracy"] for r in records}
    assert f"| mmft |  | {by_cell['mmft', 1]:.2f}{LOW_SEED_MARK} | {by_cell['mmft', 2]:.2f}{LOW_SEED_MARK} |" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # rerun: nothing trains, nothing is appended
    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(benchmark, "run_cell", no_training)
    rerun = benchmark.main(argv)
    assert rerun["ran"] == [] and len(rerun["skipped"]) == 5
    assert (out / "results.jsonl").read_text().splitlines() == lines

    # dry run: lists every cell with its state, runs nothing
    capsys.readouterr()
    dry = benchmark.main([*argv[:7], "1,2,3", *argv[8:], "--dry_run", "true"])
    printed = capsys.readouterr().out.splitlines()
    assert len(dry["cells"]) == 1 + 2 * 2 * 3 and dry["ran"] == []
    assert printed[-1] == "13 cells: 5 done, 8 to run."
    assert sum(line.startswith("todo\tsynthetic\tmmft\t") for line in printed) == 4
    assert any(line.startswith("done\tsynthetic\tce\t2\t1\t") for line in printed)
    assert len(read_results(str(out / "results.jsonl"))) == 5


def test_benchmark_reads_the_label_column_argument(tiny_clip_dir, synthetic_dataset, tmp_path):
    """A dataset whose labels are in another column and that has no validation split: the seeded hold-out and the
    k-shot sample use `--label_column`."""
    location = tmp_path / "shapes"
    no_validation = datasets.DatasetDict(train=synthetic_dataset["train"], test=synthetic_dataset["test"])
    no_validation.rename_column("label", "category").save_to_disk(str(location))
    out = tmp_path / "results"
    benchmark = load_benchmark_script()
    summary = benchmark.main(["--dataset", f"shapes={location}", "--methods", "zeroshot", "--label_column",
                              "category", "--model_name_or_path", tiny_clip_dir, "--output_dir", str(out),
                              *QUICK_FLAGS])  # fmt: skip
    (record,) = summary["ran"]
    assert record["protocol"] == "seeded 90/10 train/validation split" and record["test_samples"] == 16


SHARED_RESULTS_SCRIPT = """
import json, sys
from accelerate import PartialState
from mmft_hf.evaluation import shared_results

state = PartialState(cpu=True)
results, missing, out = sys.argv[1:]
records = shared_results(results if state.is_main_process else missing)  # rank 1 cannot see the file
with open(f"{out}/rank{state.process_index}.json", "w") as handle:
    json.dump(records, handle)
state.destroy_process_group()  # exiting with the group alive can abort (SIGABRT) in gloo as the peer leaves
"""


def test_every_rank_sees_the_records_rank_zero_read(tmp_path):
    """Every rank skips the same cells and checks the same stored settings: those rank 0 read."""
    results = tmp_path / "results.jsonl"
    expected = [{"dataset": "d", "method": "mmft", "shots": 4, "seed": seed, "settings": {"learning_rate": 1e-5}}
                for seed in (1, 2)]  # fmt: skip
    for record in expected:
        evaluation.append_result(str(results), record)
    script = tmp_path / "shared_results_check.py"
    script.write_text(SHARED_RESULTS_SCRIPT)
    run_torchrun(2, script, results, tmp_path / "missing.jsonl", tmp_path, cwd=tmp_path, timeout=120)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected, rank


def test_two_process_launch_writes_one_result_from_rank_zero(tiny_clip_dir, tmp_path):
    out = tmp_path / "ddp"
    finished = run_torchrun(2, REPORT_PROCESS_GROUP, SCRIPT, "--dataset", "synthetic", "--methods", "mmft", "--shots", "2", "--seeds", "1",
                 "--model_name_or_path", tiny_clip_dir, "--output_dir", out, *SYNTHETIC_FLAGS, *QUICK_FLAGS,
                 "--per_device_train_batch_size", "4", cwd=tmp_path)  # fmt: skip
    records = read_results(str(out / "results.jsonl"))
    assert len(records) == 1  # only rank 0 writes
    record = records[0]
    assert record["world_size"] == 2 and record["method"] == "mmft" and record["shots"] == 2
    assert record["train_steps"] == 1  # 8 rows, 2 processes x batch 4: one global batch of 8
    assert (out / "results.md").exists() and (out / "results.png").exists()
    launches = [line for line in finished.stderr.splitlines() if "Launch: " in line]
    assert len(launches) == 1 and launches[0].endswith(
        "Launch: world size 2; contrastive batch 8 = per-device batch 4 x 2 devices."
    ), launches
    for rank in (0, 1):  # a clean end: the command destroyed and freed the process group on every rank
        assert f"rank {rank}: process group alive after the command: False" in finished.stdout
        assert f"rank {rank}: gloo threads after the command: none" in finished.stdout
