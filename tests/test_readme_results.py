"""The README's synthetic results tables are what `make results` (scripts/readme_results.py) writes, checked
without training: each README block is the rendering of its committed results file, and those results are exactly
the cells, trained with exactly the settings, that the command would run now."""

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from mmft_hf.commands import benchmark
from mmft_hf.evaluation import cell_key, read_results

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("readme_results", ROOT / "scripts" / "readme_results.py")
readme_results = importlib.util.module_from_spec(_spec)
sys.modules["readme_results"] = readme_results  # its dataclass looks its module up there
_spec.loader.exec_module(readme_results)
TABLES = {table.name: table for table in readme_results.TABLES}


def stale(table) -> str:
    return (f"the README's {table.name!r} results are stale: run `make results` (or `python scripts/readme_results.py "
            f"--table {table.name}`) and commit README.md and {table.results_path.relative_to(ROOT)}")  # fmt: skip


def committed(table) -> list[dict]:
    records = read_results(str(table.results_path))
    assert records, f"{table.results_path} is missing or empty: {stale(table)}"
    return records


@pytest.mark.parametrize("name", TABLES)
def test_readme_table_is_the_committed_results_rendered(name):
    table = TABLES[name]
    records = committed(table)
    block = readme_results.readme_block(table, readme_results.README.read_text(encoding="utf-8"))
    expected = readme_results.render_block(table, records, "any timing")
    assert readme_results.without_timing(block) == readme_results.without_timing(expected), stale(table)
    # the check can fail: one seed's accuracy moved by one test image changes the table
    changed = [dict(record) for record in records]
    trained = next(record for record in changed if record.get("shots") != 0)
    trained["accuracy"] += 1 / 64
    rendered = readme_results.render_block(table, changed, "")
    assert readme_results.without_timing(rendered) != readme_results.without_timing(block)


@pytest.mark.parametrize("name", TABLES)
def test_committed_results_are_the_cells_make_results_runs_now(name, tmp_path):
    """`benchmark --dry_run` over a copy of the committed results: it refuses results trained with other settings
    (recipe defaults, methods' definitions, dataset and captions, mmft-hf version: the cells' fingerprints), and
    lists the cells a run would add (a method added to the default list, other shots)."""
    table = TABLES[name]
    records = committed(table)
    shutil.copyfile(table.results_path, tmp_path / "results.jsonl")
    summary = benchmark.main([*table.benchmark_args, "--output_dir", str(tmp_path), "--dry_run", "true"])
    planned = {cell_key(cell) for cell in summary["cells"]}
    assert planned == {cell_key(record) for record in records}, stale(table)


def test_the_tables_are_apart():
    """Two tables never share a results file or a marker, so one cannot overwrite the other."""
    assert len({table.results_path for table in TABLES.values()}) == len(TABLES)
    assert len({table.begin for table in TABLES.values()}) == len(TABLES)
