"""The README's synthetic results table is what `make results` (scripts/readme_results.py) writes, checked without
training: the README's block is the rendering of the committed results file, and those results are exactly the
cells, trained with exactly the settings, that the command would run now."""

import importlib.util
import shutil
from pathlib import Path

import pytest

from mmft_hf.commands import benchmark
from mmft_hf.evaluation import cell_key, read_results

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("readme_results", ROOT / "scripts" / "readme_results.py")
readme_results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme_results)
STALE = "the README's results are stale: run `make results` and commit README.md and results/synthetic/results.jsonl"


@pytest.fixture(scope="module")
def committed():
    records = read_results(str(readme_results.RESULTS_PATH))
    assert records, f"{readme_results.RESULTS_PATH} is missing or empty: {STALE}"
    return records


def test_readme_table_is_the_committed_results_rendered(committed):
    block = readme_results.readme_block(readme_results.README.read_text(encoding="utf-8"))
    expected = readme_results.render_block(committed, "any timing")
    assert readme_results.without_timing(block) == readme_results.without_timing(expected), STALE
    # the check can fail: one seed's accuracy moved by one test image changes the table
    changed = [dict(record) for record in committed]
    trained = next(record for record in changed if record.get("shots") != 0)
    trained["accuracy"] += 1 / 64
    assert readme_results.without_timing(readme_results.render_block(changed, "")) != readme_results.without_timing(
        block
    )


def test_committed_results_are_the_cells_make_results_runs_now(committed, tmp_path):
    """`benchmark --dry_run` over a copy of the committed results: it refuses results trained with other settings
    (recipe defaults, methods' definitions, dataset, mmft-hf version: the cells' fingerprints), and lists the cells
    a run would add (a method added to the default list, other shots)."""
    shutil.copyfile(readme_results.RESULTS_PATH, tmp_path / "results.jsonl")
    summary = benchmark.main([*readme_results.BENCHMARK_ARGS, "--output_dir", str(tmp_path), "--dry_run", "true"])
    planned = {cell_key(cell) for cell in summary["cells"]}
    assert planned == {cell_key(record) for record in committed}, STALE
