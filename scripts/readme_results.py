#!/usr/bin/env python
"""Regenerates the README's synthetic results tables from fresh benchmark runs: `make results`.

For each of `TABLES` it runs `mmft-hf benchmark` with the table's flags (the first table with the benchmark's
default methods, so a method added there joins it) into a fresh folder, keeps the run's `results.jsonl` as the
table's `results_path` (committed), and rewrites the README between the table's markers with `render_block`.
`tests/test_readme_results.py` checks, without training, that each README block is `render_block` of its committed
results (all but the timing line) and that the committed results are the cells this command would run now, with
the same settings (`benchmark --dry_run`).

    python scripts/readme_results.py            # run, keep the results, rewrite the README
    python scripts/readme_results.py --render   # rewrite the README from the committed results only
    python scripts/readme_results.py --table synthetic-long   # one table
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TIMING_PREFIX = "Timing: "


@dataclass(frozen=True)
class Table:
    """One generated block of the README: a benchmark command, its committed results and its markers.

    Args:
        name (`str`): the block's marker name (`<!-- results:NAME ... -->`) and its results folder.
        benchmark_args (`tuple[str, ...]`): the `mmft-hf benchmark` flags (output folder aside).
        title (`str`): the line above the table.
    """

    name: str
    benchmark_args: tuple[str, ...]
    title: str

    @property
    def results_path(self) -> Path:
        return ROOT / "results" / self.name / "results.jsonl"

    @property
    def begin(self) -> str:
        return f"<!-- results:{self.name} -- written by `make results` (scripts/readme_results.py); do not edit by hand -->"

    @property
    def end(self) -> str:
        return f"<!-- /results:{self.name} -->"


TABLES = (
    # The benchmark's own defaults choose the methods (and the small random CLIP, without --model_name_or_path).
    Table("synthetic", ("--dataset", "synthetic", "--shots", "1,4,16", "--seeds", "1,2,3"), "The default methods:"),
    # The caption recipes of issue 14 on long (five-sentence, over 77-token) captions.
    Table(
        "synthetic-long",
        (
            "--dataset",
            "synthetic",
            "--synthetic_caption_types",
            "long",
            "--methods",
            "flyp,mmft,mmft-sentence,mmft-mix",
            "--shots",
            "1,4,16",
            "--seeds",
            "1,2,3",
        ),
        "The caption recipes on long captions (five sentences, over 77 tokens with the class prefix):",
    ),  # fmt: skip
)


def render_block(table: Table, records: list[dict], timing: str) -> str:
    """A results block of the README: its title, the benchmark's table of `records`, how to regenerate it, timing."""
    from mmft_hf.evaluation import render_table

    command = " ".join(["mmft-hf benchmark", *table.benchmark_args])
    return "\n".join(
        [
            table.begin,
            table.title,
            "",
            render_table(records),
            "",
            f"Regenerate: `make results` runs `{command}` into a fresh folder, keeps its `results.jsonl` as "
            f"`{table.results_path.relative_to(ROOT)}` and rewrites this block.",
            f"{TIMING_PREFIX}{timing}",
            table.end,
        ]
    )


def readme_block(table: Table, text: str) -> str:
    """The block of `table` in the README text `text` (markers included)."""
    start, end = text.find(table.begin), text.find(table.end)
    if start < 0 or end < start:
        raise ValueError(f"README.md has no results block ({table.begin!r} ... {table.end!r}).")
    return text[start : end + len(table.end)]


def without_timing(block: str) -> str:
    return "\n".join(line for line in block.splitlines() if not line.startswith(TIMING_PREFIX))


def write_readme(table: Table, block: str) -> None:
    text = README.read_text(encoding="utf-8")
    README.write_text(text.replace(readme_block(table, text), block), encoding="utf-8")


def run_benchmark(table: Table) -> str:
    """Runs `table`'s benchmark into a fresh folder, keeps its results; returns the timing line."""
    with tempfile.TemporaryDirectory(prefix="mmft-results-") as folder:
        command = [sys.executable, "-m", "mmft_hf.cli", "benchmark", *table.benchmark_args, "--output_dir", folder]
        command += ["--disable_tqdm", "true", "--report_to", "none"]
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT)
        seconds = time.perf_counter() - start
        table.results_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(os.path.join(folder, "results.jsonl"), table.results_path)
    cells = len(table.results_path.read_text(encoding="utf-8").splitlines())
    threads = os.environ.get("OMP_NUM_THREADS", "all")
    return f"{cells} cells in {seconds:.0f} s (`make results`, CPU, OMP_NUM_THREADS={threads})."


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--render", action="store_true", help="Only rewrite the README from the committed results.")
    parser.add_argument("--table", choices=[table.name for table in TABLES], help="Only this table (default: all).")
    args = parser.parse_args(argv)
    from mmft_hf.evaluation import read_results

    for table in TABLES:
        if args.table not in (None, table.name):
            continue
        if args.render:
            timing = next(
                (line[len(TIMING_PREFIX) :] for line in readme_block(table, README.read_text()).splitlines()
                 if line.startswith(TIMING_PREFIX)), "not measured.",
            )  # fmt: skip
        else:
            timing = run_benchmark(table)
        block = render_block(table, read_results(str(table.results_path)), timing)
        write_readme(table, block)
        print(block)


if __name__ == "__main__":
    main()
