#!/usr/bin/env python
"""Run the compared methods side by side under one evaluation protocol; write results.jsonl, a table and a plot.

Each (dataset, method, shots, seed) cell trains into `<output_dir>/runs/<dataset>/<method>/<shots>shot-seed<seed>/`,
selects its best epoch on the validation split, evaluates the test split once and appends one JSON line to
`<output_dir>/results.jsonl` with the settings it was trained with. A rerun skips every cell already there, and
refuses (listing the differences) when its settings differ from the stored cells'. At the end `results.md` (mean ±
standard error over seeds) and `results.png` (accuracy vs shots) are rendered from the whole file.

Offline demo (synthetic shapes, a small random CLIP; shows the plumbing, not CLIP's accuracy):

    mmft-hf benchmark --dataset synthetic --methods zeroshot,flyp,ce,mmft --shots 1,2,4 --seeds 1,2,3 \\
        --output_dir results/synthetic

Paper setting on GPUs (see docs/evaluation.md; `examples/benchmark.py` is the same command as a script):

    accelerate launch -m mmft_hf.cli benchmark \\
        --dataset dtd=captioned-dtd,flowers102=captioned-flowers102,oxford_pets=captioned-oxford_pets \\
        --model_name_or_path openai/clip-vit-base-patch32 \\
        --methods zeroshot,zeroshot_ensemble,flyp,ce,mmft --shots 1,2,4,8,16,full --seeds 1,2,3 \\
        --fp16 true --output_dir results/clip-b32

Every `MMFTTrainingArguments` flag (`--num_train_epochs`, `--learning_rate`, `--per_device_train_batch_size`, ...)
applies to every trained method; methods fix only what defines them (see `mmft_hf.evaluation.BASE_METHODS`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field

import datasets
import torch
from transformers import AutoModel, AutoProcessor

from mmft_hf.captioning.builder import PRESETS
from mmft_hf.commands.flags import command_parser, errors_in_flags, flag_names
from mmft_hf.commands.launch import log_launch, process_group_teardown
from mmft_hf.evaluation import (
    METHOD_HELP,
    RESULTS_FILENAME,
    append_result,
    backbone_settings,
    cell_key,
    cell_settings,
    check_method_arguments,
    check_settings,
    dataset_settings,
    load_benchmark_splits,
    parse_method,
    parse_shots,
    plan_cells,
    plot_results,
    read_results,
    render_table,
    retention_settings,
    run_cell,
    settings_fingerprint,
    shared_results,
)
from mmft_hf.evaluation.retention import RetentionArguments, retention_set_from_flags
from mmft_hf.synthetic import DEMO_TRAINING_ARGUMENTS, build_demo_clip, make_synthetic_dataset
from mmft_hf.training.arguments import MMFTTrainingArguments

logger = logging.getLogger("benchmark")

# Without --model_name_or_path a small random CLIP is trained from scratch (see mmft_hf.synthetic). Flags on the
# command line still win.
DEMO_ARGUMENTS = [*DEMO_TRAINING_ARGUMENTS, "--num_train_epochs", "10"]


@dataclass
class BenchmarkArguments:
    _argument_group_name = "sweep (datasets, methods, shots, seeds)"  # a heading in --help (`HfArgumentParser`)

    dataset: str = field(
        default="synthetic",
        metadata={"help": "Comma-separated datasets, each NAME or NAME=LOCATION. NAME is 'synthetic', a preset ("
                  f"{', '.join(PRESETS)}) or a Hub id / directory; LOCATION (Hub id, Hub-layout or save_to_disk "
                  "directory) holds the captioned copy, e.g. dtd=captioned-dtd."},
    )  # fmt: skip
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    methods: str = field(default="zeroshot,zeroshot_ensemble,flyp,ce,mmft", metadata={"help": METHOD_HELP})
    shots: str = field(default="1,2,4,8,16,full", metadata={"help": "Comma-separated k values and/or 'full'."})
    seeds: str = field(default="1,2,3", metadata={"help": "Comma-separated seeds."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "CLIP-style model; omit for a small random CLIP (demo)."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and datasets are kept."})
    train_split: str | None = field(default=None, metadata={"help": "Training split; unset: train."})
    validation_split: str | None = field(
        default=None,
        metadata={"help": "Official validation split; a split named here must exist. Default: 'validation' where "
                  "the dataset has it and it is not the test split, else a seeded --validation_fraction of train."},
    )  # fmt: skip
    test_split: str | None = field(default=None, metadata={"help": "Test split; unset: the preset's, else test."})
    validation_fraction: float = field(default=0.1, metadata={"help": "Held-out share of train without a val split."})
    keep_checkpoints: bool = field(default=False, metadata={"help": "Keep each cell's checkpoint-* directories."})
    dry_run: bool = field(default=False, metadata={"help": "List the cells (done / to run) and exit."})
    min_seeds: int = field(default=3, metadata={"help": "Cells with fewer seeds are marked † in the table."})
    synthetic_num_classes: int = field(default=8, metadata={"help": "Classes of the synthetic dataset."})
    synthetic_train_per_class: int = field(default=16, metadata={"help": "Synthetic training images per class."})
    synthetic_eval_per_class: int = field(default=8, metadata={"help": "Synthetic val and test images per class."})
    synthetic_caption_types: str = field(
        default="visual,shape,texture",
        metadata={"help": "Comma-separated caption types of the synthetic dataset; 'long' gives five-sentence "
                  "captions over 77 tokens, for comparing mmft-sentence with mmft."},
    )  # fmt: skip


# the flags, by --help section; `--retention_*` are declared once for finetune and benchmark
ARGUMENT_DATACLASSES = (BenchmarkArguments, RetentionArguments, MMFTTrainingArguments)


def parse_arguments(argv: list[str]) -> tuple[BenchmarkArguments, RetentionArguments, MMFTTrainingArguments]:
    parser = command_parser(ARGUMENT_DATACLASSES, __doc__)
    if "--output_dir" not in argv and not any(a.startswith("--output_dir=") for a in argv):
        argv = [*argv, "--output_dir", "benchmark_results"]
    bench, retention, training = parser.parse_args_into_dataclasses(argv)
    if bench.model_name_or_path is None:
        bench, retention, training = parser.parse_args_into_dataclasses(DEMO_ARGUMENTS + argv)
    return bench, retention, training


def parse_datasets(text: str) -> dict[str, str | None]:
    """`"dtd=captioned-dtd,synthetic"` → `{"dtd": "captioned-dtd", "synthetic": None}`."""
    entries = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        name, _, location = item.partition("=")
        entries[name] = location or None
    if not entries:
        raise ValueError("--dataset is empty; give e.g. 'synthetic' or 'dtd=path/to/captioned-dtd'.")
    return entries


def dataset_source(name: str, location: str | None) -> str | None:
    """Where `--dataset NAME[=LOCATION]` is loaded from (a Hub id or a local path); `None` for the synthetic set."""
    if name == "synthetic" and location is None:
        return None
    preset = PRESETS.get(name)
    return location or (preset.source if preset else name)


def load_raw(name: str, location: str | None, bench: BenchmarkArguments) -> tuple[datasets.DatasetDict, dict]:
    """Loads one dataset with canonical `image` / `label` columns; returns it and its split names."""
    preset = PRESETS.get(name)
    source = dataset_source(name, location)
    if source is None:
        raw = make_synthetic_dataset(
            num_classes=bench.synthetic_num_classes,
            train_per_class=bench.synthetic_train_per_class,
            eval_per_class=bench.synthetic_eval_per_class,
            caption_types=tuple(name.strip() for name in bench.synthetic_caption_types.split(",") if name.strip()),
            seed=0,
        )
    else:
        if os.path.isdir(source) and any(
            os.path.exists(os.path.join(source, f)) for f in ("dataset_dict.json", "state.json")
        ):
            raw = datasets.load_from_disk(source)
        else:
            raw = datasets.load_dataset(source, bench.dataset_config_name, cache_dir=bench.cache_dir)
        if isinstance(raw, datasets.Dataset):
            raw = datasets.DatasetDict({"train": raw})
    for canonical, original in (("image", preset.image_column if preset else "image"),
                                ("label", preset.label_column if preset else "label")):  # fmt: skip
        for split in list(raw):
            columns = raw[split].column_names
            if canonical not in columns and original in columns:
                raw[split] = raw[split].rename_column(original, canonical)
    splits = list(preset.splits) if preset else list(raw)
    test = bench.test_split or (splits[-1] if preset else "test")
    return raw, {
        "train_split": bench.train_split or "train",
        "validation_split": bench.validation_split,  # None: `load_benchmark_splits` looks for "validation"
        "test_split": test,
    }


def model_loader(bench: BenchmarkArguments, raw: datasets.DatasetDict, train_split: str):
    """A function returning a fresh (model, processor): the pre-trained model, or the same random small CLIP."""
    if bench.model_name_or_path is not None:

        def load():
            model = AutoModel.from_pretrained(bench.model_name_or_path, cache_dir=bench.cache_dir)
            return model, AutoProcessor.from_pretrained(bench.model_name_or_path, cache_dir=bench.cache_dir)

        return load
    # one vocabulary from the whole training split, so every cell (and every process) gets the same tokenizer
    train = raw[train_split]

    def build():
        torch.manual_seed(0)  # every cell starts from identical "pre-trained" weights
        return build_demo_clip(train)

    return build


def cell_dir(output_dir: str, cell: dict) -> str:
    return os.path.join(
        output_dir,
        "runs",
        cell["dataset"].replace("/", "__"),
        cell["method"],
        f"{cell['shots']}shot-seed{cell['seed']}",
    )


def main(argv: list[str] | None = None) -> dict:
    """Runs the command with `argv` (default: `sys.argv[1:]`); returns the planned, run and skipped cells. Under a
    launcher the process group is destroyed at the end, whether the run succeeded or not. A `ValueError` names the
    command's flags (`--learning_rate`), not Python keywords."""
    with process_group_teardown(), errors_in_flags(flag_names(ARGUMENT_DATACLASSES)):
        return run(sys.argv[1:] if argv is None else argv)


def parse_list(text: str, flag: str, convert=str) -> list:
    """`"a, b"` -> `["a", "b"]` (each through `convert`); an empty list is an error naming `flag`."""
    items = [convert(item.strip()) for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"{flag} {text!r} names nothing; give a comma-separated list (see {flag} in --help).")
    return items


def run(argv: list[str]) -> dict:
    bench, retention_args, training_args = parse_arguments(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    log_launch(training_args, logger)
    entries = parse_datasets(bench.dataset)
    methods = parse_list(bench.methods, "--methods")
    for method in methods:  # fail before any work on a typo or an unsupported combination
        check_method_arguments(parse_method(method), training_args)
    seeds = parse_list(bench.seeds, "--seeds", int)
    cells = plan_cells(list(entries), methods, parse_shots(bench.shots), seeds)
    results_path = os.path.join(training_args.output_dir, RESULTS_FILENAME)
    is_main = training_args.process_index == 0  # sets up the process group `shared_results` broadcasts over
    stored = shared_results(results_path)  # read by rank 0 before any rank writes, the same on every rank
    done = {cell_key(record) for record in stored}

    # every cell's settings, before anything runs: a finished cell is reused, and new cells join the file, only
    # when they were (or will be) trained the same way
    backbone = backbone_settings(bench.model_name_or_path)
    loaded = {name: load_raw(name, location, bench) for name, location in entries.items()}
    facts = {
        name: dataset_settings(
            raw,
            **split_names,
            validation_fraction=bench.validation_fraction,
            label_column=training_args.label_column,
            caption_column=training_args.caption_column,
            source=dataset_source(name, entries[name]),
        )
        for name, (raw, split_names) in loaded.items()
    }
    retention = retention_set_from_flags(retention_args, training_args, bench.cache_dir)
    retention_facts = retention_settings(retention) if retention is not None else None
    for cell in cells:
        method = parse_method(cell["method"])
        cell["settings"] = cell_settings(
            method, training_args, backbone=backbone, dataset=facts[cell["dataset"]], retention=retention_facts
        )
    check_settings(stored, cells, results_path)
    pending = [cell for cell in cells if cell_key(cell) not in done]
    if bench.dry_run:
        if is_main:
            for cell in cells:
                state = "done" if cell_key(cell) in done else "todo"
                fields = [state, *(str(cell[k]) for k in ("dataset", "method", "shots", "seed"))]
                print("\t".join([*fields, cell_dir(training_args.output_dir, cell)]))
            print(f"{len(cells)} cells: {len(cells) - len(pending)} done, {len(pending)} to run.")
        return {"cells": cells, "ran": [], "skipped": [c for c in cells if cell_key(c) in done]}

    model_loaders = {}
    ran = []
    for cell in pending:
        name = cell["dataset"]
        raw, split_names = loaded[name]
        if name not in model_loaders:
            model_loaders[name] = model_loader(bench, raw, split_names["train_split"])
        splits, protocol = load_benchmark_splits(
            raw,
            cell["shots"],
            cell["seed"],
            validation_fraction=bench.validation_fraction,
            label_column=training_args.label_column,
            **split_names,
        )
        args = dataclasses.replace(
            training_args, output_dir=cell_dir(training_args.output_dir, cell), seed=cell["seed"]
        )
        logger.info(f"Cell {cell_key(cell)}: {len(splits['train'])} train / {len(splits['validation'])} validation "
                    f"/ {len(splits['test'])} test rows ({protocol}).")  # fmt: skip
        record = run_cell(
            splits,
            parse_method(cell["method"]),
            args,
            model_loaders[name],
            dataset=name,
            shots=cell["shots"],
            seed=cell["seed"],
            protocol=protocol,
            backbone=backbone["backbone"],
            keep_checkpoints=bench.keep_checkpoints,
            retention=retention,
        )
        record.update(fingerprint=settings_fingerprint(cell["settings"]), settings=cell["settings"])
        if is_main:
            append_result(results_path, record)
        ran.append(record)
        logger.info(f"Cell done: test accuracy {record['accuracy']:.2%} in {record['wall_time_s']:.1f} s.")

    summary = {"cells": cells, "ran": ran, "skipped": [c for c in cells if cell_key(c) in done]}
    if is_main:  # the table and the plot show every cell of the file, not only this run's
        records = read_results(results_path)
        table = render_table(records, min_seeds=bench.min_seeds)
        with open(os.path.join(training_args.output_dir, "results.md"), "w", encoding="utf-8") as handle:
            handle.write(table + "\n")
        plot_results(records, os.path.join(training_args.output_dir, "results.png"))
        print(table)
        summary["table"] = table
    return summary


if __name__ == "__main__":
    main()
