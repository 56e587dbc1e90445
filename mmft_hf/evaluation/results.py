"""Benchmark results: the JSONL file of finished cells, aggregation over seeds, the Markdown table and the plot."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence

import numpy as np
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from transformers.utils import logging

from .protocol import BASE_METHODS, FULL, LOW_SEED_MARK, ZERO_SHOT

logger = logging.get_logger(__name__)

RESULTS_FILENAME = "results.jsonl"


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


def shared_results(path: str) -> list[dict]:
    """The records of the results file `path`, as the main process reads them.

    Under several processes only the main process reads the file and broadcasts the records, so every process skips
    the same cells and checks the same settings (processes reading a shared file themselves can see different
    states of it). Call it after the accelerate state is set up (e.g. after reading
    `TrainingArguments.process_index`) and on every process.
    """
    records = [read_results(path) if PartialState().is_main_process else None]
    broadcast_object_list(records, from_process=0)
    return records[0]


def unique_cells(records: Iterable[dict]) -> list[dict]:
    """`records` with one record per cell (the first; a cell appears twice in files concatenated by hand), so that
    no run is counted twice in the mean over seeds."""
    kept: dict[tuple, dict] = {}
    for record in records:
        kept.setdefault(cell_key(record), record)
    return list(kept.values())


def append_result(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


# ------------------------------------------------------------------------------------------------ aggregation
def _shots_order(shots) -> tuple:
    return (1, math.inf) if str(shots) == FULL else (0, int(shots))


def _shots_label(shots) -> str:
    if str(shots) == FULL:
        return "full"
    return "0-shot" if int(shots) == ZERO_SHOT else f"{shots}-shot"


def aggregate(records: Iterable[dict], metric: str = "accuracy") -> dict[tuple, dict]:
    """Mean and standard error (sample std / √n) of `metric` (the test accuracy, or e.g.
    `"retention_accuracy_after"`), in %, per (dataset, method, shots); a cell recorded twice counts once
    (`unique_cells`), cells without the metric are left out.

    Returns:
        `{(dataset, method, shots): {"mean", "se", "n"}}`; `se` is `None` for a single run.
    """
    groups: dict[tuple, list[float]] = {}
    for record in unique_cells(records):
        if record.get(metric) is None:
            continue
        key = (record["dataset"], record["method"], str(record["shots"]))
        groups.setdefault(key, []).append(100.0 * record[metric])
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
    fewer than `min_seeds` runs are marked `†`; zero-shot cells (one deterministic run) are not. When the cells
    measured zero-shot retention, a second table gives the retention set's zero-shot accuracy with each cell's final
    model (and, in its title, with the starting model).
    """
    lines = _tables(records, aggregate(records), min_seeds)
    lines += [
        "",
        f"Test top-1 accuracy (%), mean ± standard error (sample std / √n) over seeds; {LOW_SEED_MARK}: fewer than "
        f"{min_seeds} seeds. Zero-shot rows are a single deterministic run. Model selection on the validation split.",
    ]
    retained = [record for record in records if record.get("retention_accuracy_after") is not None]
    if retained:
        names = ", ".join(sorted({str(record.get("retention_dataset")) for record in retained}))
        before = sorted({round(100 * record["retention_accuracy_before"], 2) for record in retained})
        before_text = " / ".join(f"{value:.2f}" for value in before)
        lines += ["", f"**Zero-shot retention on {names}**: zero-shot accuracy (%) of each cell's final model; the "
                  f"starting model's: {before_text}.", ""]  # fmt: skip
        lines += _tables(retained, aggregate(retained, "retention_accuracy_after"), min_seeds)
    return "\n".join(lines).replace("\n\n\n", "\n\n")


def _tables(records: Sequence[dict], stats: dict[tuple, dict], min_seeds: int) -> list[str]:
    """The lines of `render_table`'s table(s) of `stats` (from `aggregate`)."""
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
    return lines


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
