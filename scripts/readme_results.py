#!/usr/bin/env python
"""Regenerates the README's synthetic results table from a fresh benchmark run: `make results`.

It runs `mmft-hf benchmark BENCHMARK_ARGS` (every method of the benchmark's default list, so a method added there
joins the table) into a fresh folder, keeps the run's `results.jsonl` as `RESULTS_PATH` (committed), and rewrites
the README between `BEGIN` and `END` with `render_block`. `tests/test_readme_results.py` checks, without
training, that the README's block is `render_block` of the committed results (all but the timing line) and that
the committed results are the cells this command would run now, with the same settings (`benchmark --dry_run`).

    python scripts/readme_results.py            # run, keep the results, rewrite the README
    python scripts/readme_results.py --render   # rewrite the README from the committed results only
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS_PATH = ROOT / "results" / "synthetic" / "results.jsonl"
# The benchmark's own defaults choose the methods (and the small random CLIP, without --model_name_or_path).
BENCHMARK_ARGS = ["--dataset", "synthetic", "--shots", "1,4,16", "--seeds", "1,2,3"]
BEGIN = "<!-- results:synthetic -- written by `make results` (scripts/readme_results.py); do not edit by hand -->"
END = "<!-- /results:synthetic -->"
TIMING_PREFIX = "Timing: "


def render_block(records: list[dict], timing: str) -> str:
    """The README's results block: the benchmark's own table of `records`, how to regenerate it, the timing line."""
    from mmft_hf.evaluation import render_table

    command = " ".join(["mmft-hf benchmark", *BENCHMARK_ARGS])
    return "\n".join(
        [
            BEGIN,
            render_table(records),
            "",
            f"Regenerate: `make results` runs `{command}` (the benchmark's default methods) into a fresh folder, "
            f"keeps its `results.jsonl` as `{RESULTS_PATH.relative_to(ROOT)}` and rewrites this block.",
            f"{TIMING_PREFIX}{timing}",
            END,
        ]
    )


def readme_block(text: str) -> str:
    """The results block of the README text `text` (markers included)."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md has no results block ({BEGIN!r} ... {END!r}).")
    return text[start : end + len(END)]


def without_timing(block: str) -> str:
    return "\n".join(line for line in block.splitlines() if not line.startswith(TIMING_PREFIX))


def write_readme(block: str) -> None:
    text = README.read_text(encoding="utf-8")
    README.write_text(text.replace(readme_block(text), block), encoding="utf-8")


def run_benchmark() -> str:
    """Runs the benchmark into a fresh folder, keeps its results as `RESULTS_PATH`; returns the timing line."""
    with tempfile.TemporaryDirectory(prefix="mmft-results-") as folder:
        command = [sys.executable, "-m", "mmft_hf.cli", "benchmark", *BENCHMARK_ARGS, "--output_dir", folder]
        command += ["--disable_tqdm", "true", "--report_to", "none"]
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT)
        seconds = time.perf_counter() - start
        RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(os.path.join(folder, "results.jsonl"), RESULTS_PATH)
    cells = len(RESULTS_PATH.read_text(encoding="utf-8").splitlines())
    threads = os.environ.get("OMP_NUM_THREADS", "all")
    return f"{cells} cells in {seconds:.0f} s (`make results`, CPU, OMP_NUM_THREADS={threads})."


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--render", action="store_true", help="Only rewrite the README from the committed results.")
    args = parser.parse_args(argv)
    from mmft_hf.evaluation import read_results

    if args.render:
        timing = next(
            (line[len(TIMING_PREFIX) :] for line in readme_block(README.read_text()).splitlines()
             if line.startswith(TIMING_PREFIX)), "not measured.",
        )  # fmt: skip
    else:
        timing = run_benchmark()
    block = render_block(read_results(str(RESULTS_PATH)), timing)
    write_readme(block)
    print(block)


if __name__ == "__main__":
    main()
