"""The evaluation protocol: dataset splits, the compared methods, one benchmark cell, and the results table/plot.

`examples/benchmark.py` drives it. A *cell* is one (dataset, method, shots, seed); each writes one JSON line:

```python
from mmft_hf.evaluation import load_benchmark_splits, parse_method, run_cell
splits, protocol = load_benchmark_splits(dataset_dict, shots=16, seed=1)     # train / validation / test
record = run_cell(splits, parse_method("mmft"), args, load_model, dataset="dtd", shots=16, seed=1, protocol=protocol)
```

Protocol (method.md §7): the validation split is the official one where the dataset has it, otherwise a seeded,
class-stratified 10 % of train; k-shot samples k training images per class after that split (validation is not
reduced); every trained method picks its best epoch on **validation** accuracy and the test split is evaluated
once, at the end, with that checkpoint.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import random
import re
import resource
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial

import datasets
import numpy as np
import torch
from transformers import Trainer
from transformers.utils import logging

from .captioning import caption_provenance
from .collator import _crop_size
from .data import load_image, random_resized_crop, sample_few_shot, to_rgb, train_validation_split
from .prompts import CAPTION_TYPES
from .prototypes import OPENAI_IMAGENET_TEMPLATES, zero_shot_prototypes
from .trainer import MMFTTrainer
from .training_args import PROTOTYPE_SOURCES, MMFTTrainingArguments

logger = logging.get_logger(__name__)

FULL = "full"
ZERO_SHOT = 0  # the `shots` value of a zero-shot cell: it trains on nothing, so it is run once (seed 0)
LOW_SEED_MARK = "†"
RESULTS_FILENAME = "results.jsonl"


# ------------------------------------------------------------------------------------------------------ methods
@dataclass(frozen=True)
class MethodSpec:
    """How one compared method trains and classifies.

    Args:
        name (`str`): the name used on the command line, in paths and in the results.
        kind (`str`): `"zeroshot"` (no training), `"contrastive"` (`MMFTTrainer`) or `"ce"` (image encoder + linear
            head, cross-entropy).
        overrides (`dict`): `MMFTTrainingArguments` fields this method sets (e.g. `supcon_weight`, `text_source`,
            `prototype_source`, `class_template`).
        caption_types (`tuple[str, ...]`, *optional*): train on (and average) only these caption types.
    """

    name: str
    kind: str
    overrides: dict = field(default_factory=dict)
    caption_types: tuple[str, ...] | None = None

    @property
    def prototype_source(self) -> str:
        return self.overrides.get("prototype_source", "captions")


BASE_METHODS = {
    "zeroshot": MethodSpec(
        "zeroshot", "zeroshot", {"prototype_source": "single_template", "text_source": "class_name"}
    ),
    "zeroshot_ensemble": MethodSpec(
        "zeroshot_ensemble", "zeroshot", {"prototype_source": "ensemble", "text_source": "class_name"}
    ),
    "flyp": MethodSpec(
        "flyp",
        "contrastive",
        {"text_source": "class_name", "supcon_weight": 0.0, "prototype_source": "single_template"},
    ),
    "flyp_ens": MethodSpec(
        "flyp_ens", "contrastive", {"text_source": "templates", "supcon_weight": 0.0, "prototype_source": "ensemble"}
    ),
    "ce": MethodSpec("ce", "ce", {"text_source": "class_name"}),
    "mmft": MethodSpec("mmft", "contrastive", {"text_source": "captions", "supcon_weight": 0.1}),
}

METHOD_HELP = (
    "zeroshot, zeroshot_ensemble, flyp, flyp_ens, ce, mmft, and MMFT ablations written mmft-<option>[-<option>...] "
    "with options w<weight> (e.g. mmft-w0.5), types<a>+<b> (caption types, e.g. mmft-typesshape+texture), "
    "notemplate (no class-template prefix) and infer<source> (inference classifier: captions, single_template or "
    "ensemble, e.g. mmft-infersingle_template)."
)


def parse_method(name: str) -> MethodSpec:
    """The `MethodSpec` of a method name: a base method or an MMFT ablation such as `"mmft-w0.5-typesshape+texture"`.

    Args:
        name (`str`): see `METHOD_HELP`.

    Raises:
        `ValueError`: for an unknown method or option, naming the accepted ones.
    """
    if name in BASE_METHODS:
        return BASE_METHODS[name]
    base, _, rest = name.partition("-")
    if base != "mmft" or not rest:
        raise ValueError(f"Unknown method {name!r}. Methods: {METHOD_HELP}")
    overrides = dict(BASE_METHODS["mmft"].overrides)
    caption_types = None
    for option in rest.split("-"):
        if re.fullmatch(r"w(\d+(\.\d+)?)", option):
            weight = float(option[1:])
            if not 0.0 <= weight <= 1.0:
                raise ValueError(f"Method {name!r}: the SupCon weight in {option!r} must be in [0, 1].")
            overrides["supcon_weight"] = weight
        elif option.startswith("types") and len(option) > 5:
            caption_types = tuple(option[5:].split("+"))
        elif option == "notemplate":
            overrides["class_template"] = None
        elif option.startswith("infer") and option[5:] in PROTOTYPE_SOURCES:
            overrides["prototype_source"] = option[5:]
        else:
            raise ValueError(f"Method {name!r}: unknown option {option!r}. Methods: {METHOD_HELP}")
    return MethodSpec(name, "contrastive", overrides, caption_types)


def parse_shots(text: str) -> list[int | str]:
    """`"1,2,4,full"` → `[1, 2, 4, "full"]`; each k must be a positive integer."""
    shots: list[int | str] = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        if item == FULL:
            shots.append(FULL)
        elif item.isdigit() and int(item) > 0:
            shots.append(int(item))
        else:
            raise ValueError(f"Shots {item!r} in {text!r}: use positive integers or 'full', e.g. '1,2,4,8,16,full'.")
    return shots


# ------------------------------------------------------------------------------------------------------- splits
def protocol_splits(
    raw: datasets.DatasetDict,
    train_split: str = "train",
    validation_split: str | None = "validation",
    test_split: str = "test",
) -> tuple[str, str | None, str]:
    """Checks which named splits exist; returns `(train, validation or None, test)`.

    Raises:
        `ValueError`: if the train or the test split is missing (selecting or reporting on a substitute would break
            the protocol), naming the splits the dataset has.
    """
    for role, name in (("train", train_split), ("test", test_split)):
        if name not in raw:
            raise ValueError(
                f"The {role} split {name!r} is not in the dataset (it has {list(raw)}); set --{role}_split. "
                "The protocol needs a held-out test split."
            )
    if validation_split in (train_split, test_split):
        raise ValueError(f"The validation split {validation_split!r} must differ from the train and test splits.")
    return train_split, (validation_split if validation_split and validation_split in raw else None), test_split


def load_benchmark_splits(
    raw: datasets.DatasetDict,
    shots: int | str | None,
    seed: int,
    train_split: str = "train",
    validation_split: str | None = "validation",
    test_split: str = "test",
    validation_fraction: float = 0.1,
    label_column: str = "label",
) -> tuple[datasets.DatasetDict, str]:
    """The protocol's train / validation / test splits for one (shots, seed).

    Args:
        raw (`datasets.DatasetDict`): the (captioned) dataset.
        shots (`int`, `"full"` or `None`): images per class kept for training; `"full"`/`None` keeps all, `0`
            (zero-shot) keeps all too (the training rows then only name the classes).
        seed (`int`): seeds the validation hold-out (when there is no official one) and the k-shot sample.
        train_split / validation_split / test_split (`str`): split names; a missing validation split is replaced
            by a seeded, class-stratified `validation_fraction` of train.
        validation_fraction (`float`, defaults to 0.1): held-out share of train when there is no validation split.
        label_column (`str`, defaults to `"label"`): the `ClassLabel` column.

    Returns:
        `(DatasetDict with "train", "validation", "test", protocol)`; `protocol` is `"official validation split"` or
        `"seeded 90/10 train/validation split"` (with the fraction), recorded with every result.
    """
    train_name, validation_name, test_name = protocol_splits(raw, train_split, validation_split, test_split)
    train = raw[train_name]
    if validation_name is not None:
        validation, protocol = raw[validation_name], "official validation split"
    else:
        held_out = train_validation_split(train, validation_fraction, seed=seed, label_column=label_column)
        train, validation = held_out["train"], held_out["validation"]
        kept = round(100 * (1 - validation_fraction))
        protocol = f"seeded {kept}/{100 - kept} train/validation split"
    if shots not in (None, FULL, ZERO_SHOT):
        train = sample_few_shot(train, int(shots), seed=seed, label_column=label_column)
    return datasets.DatasetDict({"train": train, "validation": validation, "test": raw[test_name]}), protocol


def select_caption_types(
    dataset: datasets.Dataset,
    keep: Sequence[str],
    caption_column: str = "captions",
    all_types: Sequence[str] | None = None,
) -> datasets.Dataset:
    """Keeps only the captions of the types in `keep` (captions are stored type-major, see `caption_dataset`).

    The types and the number of captions per type come from the dataset's caption provenance, else `all_types`
    (default `("visual", "shape", "texture")`). A row with an incomplete caption list cannot be attributed to types;
    it keeps no caption (it trains on the class template alone) and the count is logged.

    Raises:
        `ValueError`: for a type the dataset was not captioned with, or lists that do not fit the type count.
    """
    provenance = caption_provenance(dataset, caption_column) or {}
    types = list(all_types or provenance.get("caption_types") or CAPTION_TYPES)
    unknown = [kind for kind in keep if kind not in types]
    if unknown:
        raise ValueError(f"Caption type(s) {unknown} not in this dataset's types {types}; choose among them.")
    per_type = provenance.get("captions_per_type")
    lengths = [len(captions) for captions in dataset[caption_column]]
    if per_type is None:
        full = max(lengths, default=0)
        if full % len(types):
            raise ValueError(
                f"Column {caption_column!r} has up to {full} captions per row, not a multiple of the {len(types)} "
                f"caption types {types}; pass all_types= with the types the dataset was captioned with."
            )
        per_type = full // len(types)
    expected = per_type * len(types)
    slots = [index for index in range(expected) if types[index // per_type] in keep]
    incomplete = sum(length != expected for length in lengths)
    if incomplete:
        logger.warning(
            f"{incomplete} of {len(lengths)} rows lack some captions and cannot be split by type; they keep none."
        )

    def keep_types(batch):
        return {caption_column: [[c[i] for i in slots] if len(c) == expected else [] for c in batch[caption_column]]}

    return dataset.map(keep_types, batched=True, desc="Selecting caption types")


# ---------------------------------------------------------------------------------------------- CE fine-tuning
class ZeroShotLinearClassifier(torch.nn.Module):
    """Image tower + a linear head initialised from zero-shot text prototypes (WiSE-FT's CE fine-tuning baseline).

    `logits = head(normalize(visual_projection(vision_model(x).pooler_output)))` with `head.weight` initialised to
    `exp(logit_scale) * prototypes` and a zero bias, so before training it predicts exactly what zero-shot CLIP
    predicts. Only the image tower is kept (the text tower would be unused parameters under DDP).

    Args:
        model (`PreTrainedModel`): a dual encoder with `vision_model`, `visual_projection` and `logit_scale`.
        prototypes (`torch.Tensor`): `[num_classes, dim]` unit-norm zero-shot text embeddings.
    """

    def __init__(self, model: torch.nn.Module, prototypes: torch.Tensor):
        super().__init__()
        for name in ("vision_model", "visual_projection", "logit_scale"):
            if not hasattr(model, name):
                raise ValueError(f"CE fine-tuning needs a CLIP-style model with `{name}`; {type(model).__name__}.")
        self.vision_model, self.visual_projection = model.vision_model, model.visual_projection
        self.head = torch.nn.Linear(prototypes.shape[1], prototypes.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(model.logit_scale.exp().detach() * prototypes.to(self.head.weight))
            self.head.bias.zero_()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        features = self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)
        logits = self.head(torch.nn.functional.normalize(features, dim=-1))
        outputs = {"logits": logits}
        if labels is not None:
            outputs["loss"] = torch.nn.functional.cross_entropy(logits.float(), labels)
        return outputs


def _image_transform(batch: dict, image_processor, image_column: str, label_column: str, crop=None) -> dict:
    """`datasets` on-the-fly transform: images → `pixel_values` (with the training crop when `crop` is given)."""
    images = [to_rgb(load_image(value)) for value in batch[image_column]]
    if crop is not None:
        size, scale, rng = crop
        images = [random_resized_crop(image, size, scale=scale, rng=rng) for image in images]
    pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
    return {"pixel_values": list(pixel_values), "labels": list(batch[label_column])}


def _stack(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([row["pixel_values"] for row in rows]),
        "labels": torch.tensor([int(row["labels"]) for row in rows]),
    }


def _accuracy(eval_prediction) -> dict[str, float]:
    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


def build_ce_trainer(model, processor, splits: datasets.DatasetDict, args: MMFTTrainingArguments, class_names):
    """A plain `transformers.Trainer` for CE fine-tuning: `ZeroShotLinearClassifier` (head from the 80-template
    zero-shot prototypes), training crop as for MMFT, `eval_accuracy` on the validation split for selection."""
    model.eval()
    prototypes = zero_shot_prototypes(model, processor.tokenizer, class_names, OPENAI_IMAGENET_TEMPLATES)
    classifier = ZeroShotLinearClassifier(model, prototypes)
    image_processor = processor.image_processor
    columns = {"image_column": args.image_column, "label_column": args.label_column}
    crop = (_crop_size(image_processor), (args.crop_scale_min, 1.0), random.Random(f"ce-crop:{args.seed}"))
    train = splits["train"].with_transform(
        partial(_image_transform, image_processor=image_processor, crop=crop, **columns)
    )
    evaluation = partial(_image_transform, image_processor=image_processor, **columns)
    trainer = Trainer(
        model=classifier,
        args=args,
        train_dataset=train,
        eval_dataset=splits["validation"].with_transform(evaluation),
        data_collator=_stack,
        compute_metrics=_accuracy,
    )
    trainer.test_dataset = splits["test"].with_transform(evaluation)
    return trainer


# ------------------------------------------------------------------------------------------------------- cells
def cell_key(record: dict) -> tuple:
    return (record["dataset"], record["method"], str(record["shots"]), int(record["seed"]))


def read_results(path: str) -> list[dict]:
    """The records of a results JSONL file (`[]` if it does not exist). A torn last line (a killed run) is skipped."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning(f"{path}:{number} is not valid JSON (an interrupted write?); that cell will rerun.")
    return records


def append_result(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def plan_cells(
    datasets_: Sequence[str], methods: Sequence[str], shots: Sequence[int | str], seeds: Sequence[int]
) -> list[dict]:
    """Every (dataset, method, shots, seed) to run. Zero-shot methods train on nothing: one cell each, shots 0, seed
    0 (their result does not depend on k or the seed)."""
    cells = []
    for dataset in datasets_:
        for method in methods:
            if parse_method(method).kind == "zeroshot":
                cells.append({"dataset": dataset, "method": method, "shots": ZERO_SHOT, "seed": 0})
                continue
            for k in shots:
                for seed in seeds:
                    cells.append({"dataset": dataset, "method": method, "shots": k, "seed": seed})
    return cells


def peak_memory() -> tuple[float, str]:
    """(MiB, kind): `torch.cuda.max_memory_allocated` on GPU (reset per cell), else the process's peak RSS so far."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"


def _best_step(trainer) -> int | None:
    checkpoint = trainer.state.best_model_checkpoint
    return int(checkpoint.rsplit("-", 1)[-1]) if checkpoint else None


def run_cell(
    splits: datasets.DatasetDict,
    method: MethodSpec,
    args: MMFTTrainingArguments,
    load_model: Callable[[], tuple],
    *,
    dataset: str,
    shots: int | str,
    seed: int,
    protocol: str,
    backbone: str,
    keep_checkpoints: bool = False,
) -> dict:
    """Runs one cell and returns its result record (not written: the caller's rank 0 appends it).

    `args.output_dir` is the cell's run directory and `args.seed` its seed. Zero-shot methods only evaluate the test
    split. Trained methods select on the validation split (`load_best_model_at_end`, `metric_for_best_model=
    "accuracy"`), then evaluate the test split once with the best checkpoint, whose files are then deleted unless
    `keep_checkpoints`.

    Args:
        splits (`datasets.DatasetDict`): `train`, `validation`, `test` from `load_benchmark_splits`.
        method (`MethodSpec`): from `parse_method`.
        args (`MMFTTrainingArguments`): this cell's arguments; the method's overrides are applied here.
        load_model (`Callable[[], (model, processor)]`): returns a fresh pre-trained model and its processor.
        dataset / shots / seed / protocol / backbone: recorded in the result.
        keep_checkpoints (`bool`, defaults to `False`): keep `checkpoint-*` directories.

    Returns:
        `dict` with dataset, method, shots, seed, backbone, accuracy (test, fraction), validation_accuracy (best,
        `None` for zero-shot), best_step, train_steps, samples, protocol, wall_time_s, peak_memory_mib and its kind.
    """
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    args = dataclasses.replace(args, **method.overrides)
    if args.load_best_model_at_end is False or args.metric_for_best_model not in ("accuracy", "eval_accuracy"):
        raise ValueError("The protocol selects on validation accuracy: keep load_best_model_at_end and "
                         "metric_for_best_model='accuracy'.")  # fmt: skip
    train = splits["train"]
    if method.caption_types:
        train = select_caption_types(train, method.caption_types, args.caption_column)
    model, processor = load_model()
    validation_accuracy = best_step = None
    train_steps = 0
    if method.kind == "zeroshot":
        trainer = MMFTTrainer(
            model=model,
            args=args,
            eval_dataset=splits["validation"],
            prototype_dataset=train,
            processing_class=processor,
        )
        metrics = trainer.evaluate(splits["test"], metric_key_prefix="test", prototype_source=method.prototype_source)
        accuracy = metrics["test_accuracy"]
    else:
        if method.kind == "ce":
            class_names = list(train.features[args.label_column].names)
            trainer = build_ce_trainer(
                model, processor, datasets.DatasetDict({**splits, "train": train}), args, class_names
            )
            test = trainer.test_dataset
        else:
            trainer = MMFTTrainer(
                model=model,
                args=args,
                train_dataset=train,
                eval_dataset=splits["validation"],
                processing_class=processor,
            )
            test = splits["test"]
        trainer.train()
        train_steps = trainer.state.global_step
        validation_accuracy, best_step = trainer.state.best_metric, _best_step(trainer)
        # the single look at the test split, with the validation-selected weights
        accuracy = trainer.evaluate(test, metric_key_prefix="test")["test_accuracy"]
        if not keep_checkpoints and args.should_save:
            for path in glob.glob(os.path.join(args.output_dir, "checkpoint-*")):
                shutil.rmtree(path, ignore_errors=True)
    memory, memory_kind = peak_memory()
    return {
        "dataset": dataset,
        "method": method.name,
        "shots": shots,
        "seed": seed,
        "backbone": backbone,
        "accuracy": float(accuracy),
        "validation_accuracy": None if validation_accuracy is None else float(validation_accuracy),
        "best_step": best_step,
        "train_steps": train_steps,
        "train_samples": len(train) if method.kind != "zeroshot" else 0,
        "validation_samples": len(splits["validation"]),
        "test_samples": len(splits["test"]),
        "protocol": protocol,
        "supcon_weight": args.supcon_weight if method.kind == "contrastive" else None,
        "num_train_epochs": args.num_train_epochs if method.kind != "zeroshot" else 0,
        "learning_rate": args.learning_rate,
        "world_size": args.world_size,
        "wall_time_s": round(time.perf_counter() - start, 3),
        "peak_memory_mib": round(memory, 1),
        "peak_memory_kind": memory_kind,
    }


# ------------------------------------------------------------------------------------------------ aggregation
def _shots_order(shots) -> tuple:
    return (1, math.inf) if str(shots) == FULL else (0, int(shots))


def _shots_label(shots) -> str:
    if str(shots) == FULL:
        return "full"
    return "0-shot" if int(shots) == ZERO_SHOT else f"{shots}-shot"


def aggregate(records: Iterable[dict]) -> dict[tuple, dict]:
    """Mean and standard error (sample std / √n) of the test accuracy, in %, per (dataset, method, shots).

    Returns:
        `{(dataset, method, shots): {"mean", "se", "n"}}`; `se` is `None` for a single run.
    """
    groups: dict[tuple, list[float]] = {}
    for record in records:
        key = (record["dataset"], record["method"], str(record["shots"]))
        groups.setdefault(key, []).append(100.0 * record["accuracy"])
    stats = {}
    for key, values in groups.items():
        n = len(values)
        se = float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else None
        stats[key] = {"mean": float(np.mean(values)), "se": se, "n": n}
    return stats


def _format(stat: dict | None, deterministic: bool, min_seeds: int) -> str:
    if stat is None:
        return ""
    text = f"{stat['mean']:.2f}" if stat["se"] is None else f"{stat['mean']:.2f} ± {stat['se']:.2f}"
    return text + (LOW_SEED_MARK if stat["n"] < min_seeds and not deterministic else "")


def render_table(records: Sequence[dict], min_seeds: int = 3) -> str:
    """Markdown table(s) of test accuracy (%), mean ± standard error over seeds.

    One dataset: rows are methods, columns shot counts. Several datasets: one table per shot count with a column per
    dataset plus **Average** (the mean of the per-dataset means, only where every dataset has the cell). Cells from
    fewer than `min_seeds` runs are marked `†`; zero-shot cells (one deterministic run) are not.
    """
    stats = aggregate(records)
    datasets_ = list(dict.fromkeys(record["dataset"] for record in records))
    methods = list(dict.fromkeys(record["method"] for record in records))
    shots = sorted({str(record["shots"]) for record in records}, key=_shots_order)
    zeroshot = {m for m in methods if m in BASE_METHODS and BASE_METHODS[m].kind == "zeroshot"}
    backbones = sorted({str(record.get("backbone")) for record in records})
    lines = []
    if len(datasets_) == 1:
        lines += [f"**{datasets_[0]}** (backbone: {', '.join(backbones)})", ""]
        lines += ["| method | " + " | ".join(_shots_label(k) for k in shots) + " |"]
        lines += ["|---|" + "---:|" * len(shots)]
        for method in methods:
            cells = [_format(stats.get((datasets_[0], method, k)), method in zeroshot, min_seeds) for k in shots]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    else:
        for k in shots:
            lines += [f"**{_shots_label(k)}** (backbone: {', '.join(backbones)})", ""]
            lines += ["| method | " + " | ".join(datasets_) + " | Average |", "|---|" + "---:|" * (len(datasets_) + 1)]
            for method in methods:
                found = [stats.get((d, method, k)) for d in datasets_]
                if not any(found):
                    continue
                cells = [_format(stat, method in zeroshot, min_seeds) for stat in found]
                average = f"{np.mean([s['mean'] for s in found]):.2f}" if all(found) else ""
                lines.append(f"| {method} | " + " | ".join(cells) + f" | {average} |")
            lines.append("")
    lines += [
        "",
        f"Test top-1 accuracy (%), mean ± standard error (sample std / √n) over seeds; {LOW_SEED_MARK}: fewer than "
        f"{min_seeds} seeds. Zero-shot rows are a single deterministic run. Model selection on the validation split.",
    ]
    return "\n".join(lines).replace("\n\n\n", "\n\n")


def plot_results(records: Sequence[dict], path: str) -> str:
    """Saves accuracy vs shots (one line per method, standard-error bars, one panel per dataset) as a PNG.

    Zero-shot methods are drawn as dashed horizontal lines. Uses matplotlib's Agg backend (no display needed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = aggregate(records)
    datasets_ = list(dict.fromkeys(record["dataset"] for record in records))
    methods = list(dict.fromkeys(record["method"] for record in records))
    shots = [k for k in sorted({str(r["shots"]) for r in records}, key=_shots_order) if k != str(ZERO_SHOT)]
    figure, axes = plt.subplots(1, len(datasets_), figsize=(5 * len(datasets_), 4), squeeze=False)
    for axis, dataset in zip(axes[0], datasets_):
        for index, method in enumerate(methods):
            color = f"C{index % 10}"
            flat = stats.get((dataset, method, str(ZERO_SHOT)))
            if flat is not None:
                axis.axhline(flat["mean"], linestyle="--", color=color, label=method)
                continue
            points = [(x, stats[(dataset, method, k)]) for x, k in enumerate(shots) if (dataset, method, k) in stats]
            if points:
                axis.errorbar(
                    [x for x, _ in points],
                    [s["mean"] for _, s in points],
                    yerr=[s["se"] or 0.0 for _, s in points],
                    marker="o",
                    capsize=3,
                    color=color,
                    label=method,
                )
        axis.set_xticks(range(len(shots)), [_shots_label(k) for k in shots])
        axis.set_title(dataset)
        axis.set_xlabel("training images per class")
        axis.set_ylabel("test accuracy (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
