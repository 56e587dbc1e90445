"""What a benchmark result was trained with: the settings of a cell, their fingerprint, and the check that one
results file never mixes cells trained differently.

Every record in `results.jsonl` carries `settings` (every setting that changes the cell's result: the model, the
recipe flags with the method's overrides, the dataset's classes, splits, content (the Hub revision, or a hash of the
rows with the image files' bytes) and caption provenance, the mmft-hf version)
and `fingerprint` (a hash of them). Before a sweep runs anything, `check_settings` compares the cells it plans with
the stored ones and refuses, listing the differences, when a table would put differently trained cells side by
side.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence

import datasets
import pyarrow as pa
from transformers import TrainingArguments

from ..captioning.provenance import VOLATILE_PROVENANCE_KEYS, caption_provenance
from ..model_card import portable_reference
from ..version import __version__
from .protocol import MethodSpec, protocol_splits

# `TrainingArguments` / `MMFTTrainingArguments` fields that cannot change a cell's result: paths, logging, how
# checkpoints are kept, evaluation batching, data-loading speed, the device and compilation (the same computation,
# up to floating-point noise), the launcher's plumbing, and the seed (a coordinate of the cell, not a setting).
# Every other field, including ones added later, is part of the fingerprint.
RESULT_NEUTRAL_ARGUMENTS = frozenset(
    {
        "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "seed", "do_train", "do_eval", "do_predict",
        "logging_dir", "logging_strategy", "logging_steps", "logging_first_step", "logging_nan_inf_filter",
        "log_on_each_node", "log_level", "log_level_replica", "include_num_input_tokens_seen", "disable_tqdm",
        "report_to", "run_name", "project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id",
        "push_to_hub", "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push",
        "hub_revision", "save_total_limit", "save_on_each_node", "save_only_model", "save_safetensors",
        "enable_jit_checkpoint", "restore_callback_states_from_checkpoint", "ignore_data_skip",
        "per_device_eval_batch_size", "eval_accumulation_steps", "eval_do_concat_batches", "eval_use_gather_object",
        "prototype_batch_size", "skip_memory_metrics", "debug", "use_cache", "dataloader_num_workers",
        "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
        "dataloader_multiprocessing_context", "use_cpu", "torch_compile", "torch_compile_backend",
        "torch_compile_mode", "torch_empty_cache_steps", "activation_checkpointing", "activation_checkpointing_kwargs",
        "gradient_checkpointing", "gradient_checkpointing_kwargs", "local_rank", "ddp_backend", "ddp_timeout",
        "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_find_unused_parameters", "ddp_static_graph",
    }
)  # fmt: skip
# What a zero-shot cell's result depends on besides the model and the dataset: it trains nothing.
ZERO_SHOT_ARGUMENTS = ("prototype_source", "class_template", "text_source", "label_column", "fp16", "bf16",
                       "fp16_full_eval", "bf16_full_eval", "tf32")  # fmt: skip
# Settings that define a method (see `BASE_METHODS` and the ablation options): two methods differ in them by design.
METHOD_SETTINGS = ("supcon_weight", "text_source", "prototype_source", "class_template", "caption_types",
                   "wise_ft_alphas", "caption_sampling", "template_probability")  # fmt: skip
DATASET_KEY = "dataset"
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _canonical(value):
    """`value` as JSON would give it back (tuples become lists, enums and other objects strings)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def backbone_settings(model_name_or_path: str | None, demo_name: str = "tiny-random-clip") -> dict:
    """How a cell's starting model is identified, with no path of this machine.

    Args:
        model_name_or_path (`str`, *optional*): a Hub id or a local directory; `None` for the demo's random model.
        demo_name (`str`): the name recorded for the demo model.

    Returns:
        `{"backbone": Hub id or folder name}`, plus `"backbone_weights_sha256"` for a local directory (the hash of
        its weight files, so two folders of the same name that hold other weights are told apart).
    """
    if model_name_or_path is None:
        return {"backbone": demo_name}
    reference, on_hub = portable_reference(model_name_or_path)
    settings = {"backbone": reference}
    if os.path.isdir(model_name_or_path) and not on_hub:
        digest = hashlib.sha256()
        for name in sorted(os.listdir(model_name_or_path)):
            if name.endswith(WEIGHT_FILE_SUFFIXES):
                digest.update(name.encode())
                with open(os.path.join(model_name_or_path, name), "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 22), b""):
                        digest.update(block)
        settings["backbone_weights_sha256"] = digest.hexdigest()[:16]
    return settings


_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
# the caption-derived facts, dropped from the settings of methods that read no caption
CAPTION_FACTS = ("caption_provenance", "captions_sha256")


def hub_revision(dataset: datasets.Dataset) -> str | None:
    """The commit of the Hub repository a dataset was loaded from: `load_dataset` caches a Hub dataset under
    `<name>/<config>/<version>/<commit sha>/`. `None` when the cache files do not say (in memory, a local folder)."""
    for cache_file in dataset.cache_files:
        folder = os.path.basename(os.path.dirname(cache_file["filename"]))
        if _COMMIT_SHA.fullmatch(folder):
            return folder
    return None


def content_sha256(dataset: datasets.Dataset, columns: Sequence[str], batch_size: int = 256) -> str:
    """A hash of the values of `columns` in row order. Image columns contribute each image's bytes: the embedded
    ones, else the file's content read from its path (an image folder stores paths, and a file replaced under the
    same name must change the hash).

    Raises:
        `ValueError`: naming the row, for an image whose file cannot be read.
    """
    digest = hashlib.sha256()
    images = {name for name in columns if isinstance(dataset.features.get(name), datasets.Image)}
    offset = 0
    for batch in dataset.select_columns(list(columns)).with_format("arrow").iter(batch_size=batch_size):
        for name in columns:
            column = batch.column(name)
            digest.update(name.encode())
            if name in images:
                for position, value in enumerate(column.to_pylist()):
                    if value is None:
                        digest.update(b"\0")
                    elif value.get("bytes") is not None:
                        digest.update(value["bytes"])
                    else:
                        try:
                            with open(value["path"], "rb") as handle:
                                digest.update(handle.read())
                        except OSError as error:
                            raise ValueError(f"Row {offset + position}: column {name!r} names the image file "
                                             f"{value['path']!r}, which cannot be read ({error}).") from None  # fmt: skip
                continue
            table = pa.table({name: column})
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            digest.update(sink.getvalue().to_pybytes())
        offset += batch.num_rows
    return digest.hexdigest()[:16]


def dataset_settings(
    raw: datasets.DatasetDict,
    train_split: str = "train",
    validation_split: str | None = None,
    test_split: str | None = "test",
    validation_fraction: float = 0.1,
    label_column: str = "label",
    caption_column: str = "captions",
    source: str | None = None,
) -> dict:
    """The facts of a dataset that change a cell's result: its classes, the protocol's splits and their sizes, what
    the data is, and the caption provenance of its training split (captioner, prompt, caption types; not the shard
    bookkeeping).

    What the data is: for a dataset loaded from the Hub, the repository's commit (`hub_revision`); otherwise (a
    local folder, a `save_to_disk` copy, a dataset made in memory) `content_sha256` of each split's rows without
    the captions, image files' bytes included, and `captions_sha256` of the training captions, so replacing the
    images or the captions under the same names and row counts changes the settings.

    Arguments are those of `load_benchmark_splits`, plus `source` (`str`, *optional*): where the dataset was loaded
    from (a Hub id or a local path); `None` for one made in memory. Raises `ValueError` as `protocol_splits` does.
    """
    train_name, validation_name, test_name = protocol_splits(raw, train_split, validation_split, test_split)
    label = raw[train_name].features.get(label_column)
    names = list(label.names) if isinstance(label, datasets.ClassLabel) else None
    splits = {"train": train_name, "validation": validation_name, "test": test_name}
    settings = {
        "num_classes": len(names) if names is not None else None,
        "class_names_sha256": hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16],
        "splits": splits,
        "split_rows": {role: len(raw[name]) for role, name in splits.items() if name is not None},
        "validation_fraction": validation_fraction if validation_name is None else None,
    }
    revision = None if source is None or os.path.exists(source) else hub_revision(raw[train_name])
    if revision is not None:
        settings["hub_revision"] = revision
    else:
        settings["content_sha256"] = {
            role: content_sha256(raw[name], [c for c in raw[name].column_names if c != caption_column])
            for role, name in splits.items()
            if name is not None
        }
        if caption_column in raw[train_name].column_names:
            settings["captions_sha256"] = content_sha256(raw[train_name], [caption_column])
    provenance = (
        caption_provenance(raw[train_name], caption_column) if caption_column in raw[train_name].features else None
    )
    if provenance:
        provenance = {key: value for key, value in provenance.items() if key not in VOLATILE_PROVENANCE_KEYS}
    settings["caption_provenance"] = provenance
    return _canonical(settings)


def retention_settings(retention) -> dict:
    """What identifies a zero-shot retention set (`RetentionSet`): its name, the class names and the content of its
    rows (`content_sha256`, image bytes included)."""
    return _canonical(
        {
            "dataset": retention.name,
            "rows": len(retention.dataset),
            "class_names_sha256": hashlib.sha256(json.dumps(list(retention.class_names)).encode()).hexdigest()[:16],
            "content_sha256": content_sha256(retention.dataset, [retention.image_column, retention.label_column]),
        }
    )


def cell_settings(
    method: MethodSpec, args: TrainingArguments, *, backbone: dict, dataset: dict, retention: dict | None = None
) -> dict:
    """Every setting that changes the result of a cell of `method` (its coordinates aside: dataset name, shots,
    seed).

    Args:
        method (`MethodSpec`): the method; its overrides replace the corresponding arguments.
        args (`MMFTTrainingArguments`): the sweep's arguments.
        backbone (`dict`): from `backbone_settings`.
        dataset (`dict`): from `dataset_settings`.
        retention (`dict`, *optional*): from `retention_settings`, when the sweep measures zero-shot retention.

    Returns:
        `dict` (JSON values): the mmft-hf version and the backbone; for a zero-shot method the few arguments its
        evaluation reads, for a trained one every argument not in `RESULT_NEUTRAL_ARGUMENTS` plus the world size;
        the method's caption types and WiSE-FT alphas; under `"dataset"` the dataset facts (the caption provenance
        and the captions' hash only for methods that read captions); under `"retention"` the retention set.
    """
    values = {**args.to_dict(), **method.overrides}
    settings = {"mmft_hf_version": __version__, **backbone}
    data = dict(dataset)
    if method.kind == "zeroshot":
        settings.update({name: values.get(name) for name in ZERO_SHOT_ARGUMENTS})
    else:
        settings.update({name: value for name, value in values.items() if name not in RESULT_NEUTRAL_ARGUMENTS})
        settings["world_size"] = args.world_size  # the contrastive batch is per-device batch x processes
    reads_captions = method.kind == "contrastive" and "captions" in (values["text_source"], values["prototype_source"])
    if not reads_captions:
        for key in CAPTION_FACTS:
            data.pop(key, None)
    if method.caption_types:
        settings["caption_types"] = list(method.caption_types)
    if method.wise_ft_alphas:
        settings["wise_ft_alphas"] = list(method.wise_ft_alphas)
    if retention is not None:
        settings["retention"] = retention
    settings[DATASET_KEY] = data
    return _canonical(settings)


def settings_fingerprint(settings: dict) -> str:
    """A short hash of `settings` (canonical JSON)."""
    return hashlib.sha256(json.dumps(_canonical(settings), sort_keys=True).encode()).hexdigest()[:16]


def _flatten(settings: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _compared_keys(first: dict, second: dict, same_method: bool, same_dataset: bool) -> set[str]:
    """The flattened setting names two cells must agree on: all of them within one (dataset, method); across
    methods the settings both have except those that define a method; across datasets none of the dataset's."""
    keys = set(first) | set(second) if same_method and same_dataset else set(first) & set(second)
    if not same_method:
        keys = {key for key in keys if key.split(".")[0] not in METHOD_SETTINGS}
    if not same_dataset:
        keys = {key for key in keys if key.split(".")[0] != DATASET_KEY}
    return keys


def _cell_name(cell: dict) -> str:
    return f"{cell['dataset']}/{cell['method']}/{cell['shots']}-shot/seed {cell['seed']}"


def settings_conflicts(stored: Sequence[dict], planned: Sequence[dict]) -> dict[str, dict[str, list[str]]]:
    """The settings on which the cells of this run disagree with each other or with the stored ones.

    Two cells of one (dataset, method) must agree on every setting; cells of different methods on every setting
    that does not define a method (the learning rate of `flyp` and `mmft` in one table, say); cells of different
    datasets on every setting but the dataset's. A stored record without `settings` (written before fingerprints)
    disagrees with any planned cell of its (dataset, method).

    Args:
        stored (`Sequence[dict]`): the records already in the results file.
        planned (`Sequence[dict]`): the cells of this run, each with its `settings`.

    Returns:
        `{setting: {value (JSON text): [where: "this run" or "stored: <cell>", ...]}}`, empty when all agree.
    """
    # cells with equal (dataset, method, settings) are compared once
    groups: dict[tuple, dict] = {}
    for origin, cells in (("stored", stored), ("this run", planned)):
        for cell in cells:
            settings = cell.get("settings")
            key = (cell["dataset"], cell["method"], None if settings is None else settings_fingerprint(settings))
            group = groups.setdefault(
                key, {"cell": cell, "flat": _flatten(settings or {}), "places": [], "run": False}
            )
            group["run"] |= origin == "this run"
            where = "this run" if origin == "this run" else f"stored: {_cell_name(cell)}"
            if where not in group["places"]:
                group["places"].append(where)
    conflicts: dict[str, dict[str, list[str]]] = {}

    def note(key, value, group):
        places = conflicts.setdefault(key, {}).setdefault(json.dumps(value, sort_keys=True), [])
        places.extend(place for place in group["places"] if place not in places)

    ordered = list(groups.values())
    for i, first in enumerate(ordered):
        for second in ordered[i + 1 :]:
            if not (first["run"] or second["run"]):
                continue  # stored cells were checked when they ran
            same_method = first["cell"]["method"] == second["cell"]["method"]
            same_dataset = first["cell"]["dataset"] == second["cell"]["dataset"]
            if "settings" not in first["cell"] or "settings" not in second["cell"]:
                if same_method and same_dataset:
                    for group in (first, second):
                        recorded = "settings" in group["cell"]
                        note(
                            "settings", "recorded" if recorded else "not recorded (written before fingerprints)", group
                        )
                continue
            for key in _compared_keys(first["flat"], second["flat"], same_method, same_dataset):
                missing = "<not recorded>"
                if first["flat"].get(key, missing) != second["flat"].get(key, missing):
                    note(key, first["flat"].get(key, missing), first)
                    note(key, second["flat"].get(key, missing), second)
    return conflicts


def describe_conflicts(conflicts: dict[str, dict[str, list[str]]], results_path: str, max_places: int = 3) -> str:
    """A message listing each differing setting with its values and where each value comes from."""
    lines = [
        f"{results_path} holds results trained with other settings than this run; the table would mix them "
        "silently, so nothing was run. Differences:"
    ]
    for key in sorted(conflicts):
        lines.append(f"  {key}:")
        for value, places in conflicts[key].items():
            shown = ", ".join(places[:max_places]) + (
                f" and {len(places) - max_places} more" if len(places) > max_places else ""
            )
            lines.append(f"    {value}  ({shown})")
    lines.append(
        "Rerun with the stored settings to extend the sweep, or write this one to another --output_dir (or move "
        f"{os.path.basename(results_path)} aside)."
    )
    return "\n".join(lines)


def check_settings(stored: Iterable[dict], planned: Sequence[dict], results_path: str) -> None:
    """Raises `ValueError` (see `describe_conflicts`) if `settings_conflicts(stored, planned)` finds any."""
    conflicts = settings_conflicts(list(stored), planned)
    if conflicts:
        raise ValueError(describe_conflicts(conflicts, results_path))
