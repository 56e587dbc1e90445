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
import os
import re
import resource
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import datasets
import torch
from transformers.utils import logging

from ..captioning.prompts import CAPTION_TYPES, validate_caption_types
from ..captioning.provenance import SOURCES_COLUMN, attach_provenance, caption_provenance, provenance_captioners
from ..training.arguments import PROTOTYPE_SOURCES, MMFTTrainingArguments
from ..training.data import align_label_names, sample_few_shot, train_validation_split
from ..training.trainer import MMFTTrainer
from .ce_baseline import build_ce_trainer, check_ce_arguments
from .retention import RetentionSet
from .wise_ft_curve import DEFAULT_WISE_FT_ALPHAS, WiseFTSweep, best_alpha

logger = logging.get_logger(__name__)

FULL = "full"
DEFAULT_VALIDATION_SPLIT = "validation"  # used when present and no validation split is named
ZERO_SHOT = 0  # the `shots` value of a zero-shot cell: it trains on nothing, so it is run once (seed 0)
LOW_SEED_MARK = "†"
DEFAULT_MIX_PROBABILITY = 0.5  # `mmft-mix`: half the fetches train on the class template alone


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
        wise_ft_alphas (`tuple[float, ...]`, *optional*): after training, evaluate these WiSE-FT interpolations
            with the starting model on validation and keep the best (`wiseft`).
    """

    name: str
    kind: str
    overrides: dict = field(default_factory=dict)
    caption_types: tuple[str, ...] | None = None
    wise_ft_alphas: tuple[float, ...] | None = None

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
    "wiseft": MethodSpec(
        "wiseft",
        "contrastive",
        {"text_source": "captions", "supcon_weight": 0.1},
        wise_ft_alphas=DEFAULT_WISE_FT_ALPHAS,
    ),
}

METHOD_HELP = (
    "zeroshot, zeroshot_ensemble, flyp, flyp_ens, ce, mmft, wiseft (mmft, then the WiSE-FT interpolation with the "
    "starting model whose alpha in 0, 0.1, ..., 1 is best on validation), and MMFT ablations written mmft-<option>[-<option>...] "
    "with options w<weight> (e.g. mmft-w0.5), types<a>+<b> (caption types, e.g. mmft-typesshape+texture), "
    "notemplate (no class-template prefix), infer<source> (inference classifier: captions, single_template or "
    "ensemble, e.g. mmft-infersingle_template), sentence (train on one sentence of a caption per fetch, and average "
    "sentences in the prototypes: mmft-sentence) and mix[<p>] (train on the class template alone with probability p, "
    "default 0.5: mmft-mix, mmft-mix0.25)."
)


def parse_method(name: str) -> MethodSpec:
    """The `MethodSpec` of a method name: a base method or an MMFT ablation such as `"mmft-w0.5-typesshape+texture"`.

    Args:
        name (`str`): see `METHOD_HELP`.

    Raises:
        `ValueError`: for an unknown method or option, naming the accepted ones, or malformed caption types (empty,
            duplicated); whether the dataset has the types is checked when a cell selects them.
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
            try:
                caption_types = validate_caption_types(option[5:].split("+"))
            except ValueError as error:
                raise ValueError(f"Method {name!r}: {error}") from None
        elif option == "notemplate":
            overrides["class_template"] = None
        elif option.startswith("infer") and option[5:] in PROTOTYPE_SOURCES:
            overrides["prototype_source"] = option[5:]
        elif option == "sentence":
            overrides["caption_sampling"] = "sentence"
        elif re.fullmatch(r"mix(\d+(\.\d+)?)?", option):
            probability = float(option[3:] or DEFAULT_MIX_PROBABILITY)
            if not 0.0 <= probability <= 1.0:
                raise ValueError(f"Method {name!r}: the template probability in {option!r} must be in [0, 1].")
            overrides["template_probability"] = probability
        else:
            raise ValueError(f"Method {name!r}: unknown option {option!r}. Methods: {METHOD_HELP}")
    return MethodSpec(name, "contrastive", overrides, caption_types)


def parse_shots(text: str) -> list[int | str]:
    """The value of `--shots`: `"1,2,4,full"` → `[1, 2, 4, "full"]`.

    Raises:
        `ValueError`: for a k that is not a positive integer or `full`, or a list naming nothing (`""`).
    """
    shots: list[int | str] = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        if item == FULL:
            shots.append(FULL)
        elif item.isdigit() and int(item) > 0:
            shots.append(int(item))
        else:
            raise ValueError(f"--shots {text!r}: {item!r} is not a shot count; use positive integers or 'full', "
                             "e.g. '1,2,4,8,16,full'.")  # fmt: skip
    if not shots:
        raise ValueError(f"--shots {text!r} names no shot count; use positive integers or 'full', e.g. '1,2,16,full'.")
    return shots


# ------------------------------------------------------------------------------------------------------- splits
def protocol_splits(
    raw: datasets.DatasetDict,
    train_split: str = "train",
    validation_split: str | None = None,
    test_split: str | None = "test",
) -> tuple[str, str | None, str | None]:
    """Checks the named splits and resolves the validation split; returns `(train, validation, test)`.

    Args:
        raw (`datasets.DatasetDict`): the dataset.
        train_split (`str`, defaults to `"train"`): must exist.
        validation_split (`str`, *optional*): a named split must exist. `None` picks `"validation"` when the
            dataset has it and it is neither the train nor the test split, else returns `None` (the caller then holds
            out part of train).
        test_split (`str`, *optional*, defaults to `"test"`): must exist when named; `None` means no test split.

    Raises:
        `ValueError`: if a named split is missing (selecting or reporting on a substitute would break the protocol),
            naming the splits the dataset has, or if the validation split is the train or the test split.
    """
    hints = {
        "train": "",
        "validation": f" Leave it unset to use {DEFAULT_VALIDATION_SPLIT!r} where the dataset has it, else a seeded "
        "hold-out of train.",
        "test": " The protocol needs a held-out test split.",
    }
    for role, name in (("train", train_split), ("validation", validation_split), ("test", test_split)):
        if name is not None and name not in raw:
            raise ValueError(
                f"The {role} split {name!r} is not in the dataset (it has {list(raw)}); set --{role}_split."
                + hints[role]
            )
    if validation_split is None:
        found = DEFAULT_VALIDATION_SPLIT in raw and DEFAULT_VALIDATION_SPLIT not in (train_split, test_split)
        return train_split, DEFAULT_VALIDATION_SPLIT if found else None, test_split
    if validation_split in (train_split, test_split):
        raise ValueError(f"The validation split {validation_split!r} must differ from the train and test splits.")
    return train_split, validation_split, test_split


def load_benchmark_splits(
    raw: datasets.DatasetDict,
    shots: int | str | None,
    seed: int,
    train_split: str = "train",
    validation_split: str | None = None,
    test_split: str | None = "test",
    validation_fraction: float = 0.1,
    label_column: str = "label",
) -> tuple[datasets.DatasetDict, str]:
    """The protocol's train / validation / test splits for one (shots, seed). The labels of validation and test are
    matched to the training class names by name (`align_label_names`), whatever order their `ClassLabel` lists.

    Args:
        raw (`datasets.DatasetDict`): the (captioned) dataset.
        shots (`int`, `"full"` or `None`): images per class kept for training; `"full"`/`None` keeps all, `0`
            (zero-shot) keeps all too (the training rows then only name the classes).
        seed (`int`): seeds the validation hold-out (when there is no official one) and the k-shot sample.
        train_split (`str`, defaults to `"train"`): the training split.
        validation_split (`str`, *optional*): the official validation split; a named split must exist. `None` uses
            `"validation"` where the dataset has it (and it is not the test split), else a seeded, class-stratified
            `validation_fraction` of train.
        test_split (`str`, *optional*, defaults to `"test"`): must exist when named; `None` returns no `"test"`.
        validation_fraction (`float`, defaults to 0.1): held-out share of train when there is no validation split.
        label_column (`str`, defaults to `"label"`): the `ClassLabel` column.

    Returns:
        `(DatasetDict with "train", "validation" and, unless test_split is None, "test", protocol)`; `protocol` is
        `"official validation split"` or `"seeded 90/10 train/validation split"` (with the fraction), recorded with
        every result.

    Raises:
        `ValueError`: see `protocol_splits`.
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
    splits = {"train": train, "validation": validation}
    if test_name is not None:
        splits["test"] = raw[test_name]
    label_feature = train.features[label_column]
    if isinstance(label_feature, datasets.ClassLabel):  # evaluated splits follow the training label order, by name
        for name in ("validation", "test"):
            if name in splits:
                splits[name] = align_label_names(splits[name], label_feature.names, label_column, name)
    return datasets.DatasetDict(splits), protocol


def select_caption_types(
    dataset: datasets.Dataset,
    keep: Sequence[str],
    caption_column: str = "captions",
    all_types: Sequence[str] | None = None,
) -> datasets.Dataset:
    """Keeps only the captions of the types in `keep` (captions are stored type-major, see `caption_dataset`).

    The types and the number of captions per type come from the dataset's caption provenance, else `all_types`
    (default `("visual", "shape", "texture")`). A row with an incomplete caption list cannot be attributed to types;
    it keeps no caption (it trains on the class template alone) and the count is logged. The returned dataset's
    provenance (when the dataset has one) lists the kept types only.

    Raises:
        `ValueError`: for a type the dataset was not captioned with, or lists that do not fit the type count.
    """
    keep = validate_caption_types(keep)
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
    block = per_type * len(types)  # one captioner's captions; several are stored captioner-major
    expected = block * max(1, len(provenance_captioners(provenance)))
    slots = [index for index in range(expected) if types[index % block // per_type] in keep]
    incomplete = sum(length != expected for length in lengths)
    if incomplete:
        logger.warning(
            f"{incomplete} of {len(lengths)} rows lack some captions and cannot be split by type; they keep none."
        )

    def keep_types(batch):
        columns = [name for name in (caption_column, SOURCES_COLUMN) if name in batch]  # sources stay parallel
        return {name: [[c[i] for i in slots] if len(c) == expected else [] for c in batch[name]] for name in columns}

    selected = dataset.map(keep_types, batched=True, desc="Selecting caption types")
    if provenance:
        kept = [kind for kind in types if kind in keep]
        selected = attach_provenance(selected, {**provenance, "caption_types": kept}, caption_column)
    return selected


def check_method_arguments(method: MethodSpec, args: MMFTTrainingArguments) -> None:
    """Raises `ValueError` for a method the arguments cannot run: overrides that make invalid arguments (e.g.
    `mmft-notemplate-mix`: template mixing without a template), and `ce` with `use_lora` (the CE baseline fine-tunes
    the whole image tower and a linear head; it has no LoRA variant)."""
    dataclasses.replace(args, **method.overrides)  # MMFTTrainingArguments' checks, as `run_cell` will apply them
    if method.kind == "ce":
        check_ce_arguments(args)


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
    retention: RetentionSet | None = None,
) -> dict:
    """Runs one cell and returns its result record (not written: the caller's rank 0 appends it).

    `args.output_dir` is the cell's run directory and `args.seed` its seed. Zero-shot methods only evaluate the test
    split. Trained methods select on the validation split (`load_best_model_at_end`, `metric_for_best_model=
    "accuracy"`), then evaluate the test split once with the best checkpoint, whose files are then deleted unless
    `keep_checkpoints`. A cell never resumes, so its checkpoints hold the model alone (`save_only_model`), not the
    optimizer, scheduler and RNG states (except under DeepSpeed or FSDP, which cannot reload such a checkpoint).

    Args:
        splits (`datasets.DatasetDict`): `train`, `validation`, `test` from `load_benchmark_splits`.
        method (`MethodSpec`): from `parse_method`.
        args (`MMFTTrainingArguments`): this cell's arguments; the method's overrides are applied here.
        load_model (`Callable[[], (model, processor)]`): returns a fresh pre-trained model and its processor.
        dataset / shots / seed / protocol / backbone: recorded in the result.
        keep_checkpoints (`bool`, defaults to `False`): keep `checkpoint-*` directories.
        retention (`RetentionSet`, *optional*): a dataset whose zero-shot accuracy is measured with the starting
            model and with the cell's final model (for zero-shot methods, once: both are the same model).

    Returns:
        `dict` with dataset, method, shots, seed, backbone, accuracy (test, fraction), validation_accuracy (best,
        `None` for zero-shot), best_step, train_steps, samples, protocol, wall_time_s, peak_memory_mib and its kind;
        with WiSE-FT `wise_ft_alpha` (chosen on validation) and `wise_ft_curve` (validation accuracy per alpha);
        with a retention set `retention_dataset`, `retention_accuracy_before` and `retention_accuracy_after`.
    """
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    args = dataclasses.replace(args, **method.overrides, save_only_model=not (args.deepspeed or args.fsdp))
    if args.load_best_model_at_end is False or args.metric_for_best_model not in ("accuracy", "eval_accuracy"):
        raise ValueError("The protocol selects on validation accuracy: keep load_best_model_at_end and "
                         "metric_for_best_model='accuracy'.")  # fmt: skip
    train = splits["train"]
    if method.caption_types:
        train = select_caption_types(train, method.caption_types, args.caption_column)
    model, processor = load_model()
    validation_accuracy = best_step = None
    train_steps = 0
    extra = {}
    if retention is not None:
        before = retention.accuracy(model.to(args.device), processor, args.per_device_eval_batch_size)
        extra = {"retention_dataset": retention.name, "retention_accuracy_before": before}
    if method.kind == "zeroshot":
        # template prototypes need only the class names: the captions are left unread
        trainer = MMFTTrainer(
            model=model,
            args=args,
            eval_dataset=splits["test"],
            prototype_dataset=train.select_columns([args.image_column, args.label_column]),
            processing_class=processor,
        )
        metrics = trainer.evaluate(metric_key_prefix="test", prototype_source=method.prototype_source)
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
        validation_accuracy, best_step = trainer.state.best_metric, trainer.state.best_global_step
        if method.wise_ft_alphas:
            sweep = WiseFTSweep(trainer, load_model()[0])
            curve = sweep.curve(method.wise_ft_alphas, {"validation": splits["validation"]})
            alpha = best_alpha(curve)
            sweep.apply(alpha)
            validation_accuracy = next(point["validation_accuracy"] for point in curve if point["alpha"] == alpha)
            extra.update(wise_ft_alpha=alpha, wise_ft_curve=curve)
        # the single look at the test split, with the validation-selected weights
        accuracy = trainer.evaluate(test, metric_key_prefix="test")["test_accuracy"]
        if not keep_checkpoints and args.should_save:
            for path in glob.glob(os.path.join(args.output_dir, "checkpoint-*")):
                shutil.rmtree(path, ignore_errors=True)
    if retention is not None:
        after = extra["retention_accuracy_before"]
        if method.kind != "zeroshot":  # the CE classifier shares the image tower with `model`
            tuned = model.to(args.device) if method.kind == "ce" else trainer.model
            after = retention.accuracy(tuned, processor, args.per_device_eval_batch_size)
        extra["retention_accuracy_after"] = after
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
        **extra,
    }
