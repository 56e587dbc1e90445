"""Captioning at the edges: what two concurrent runs pay, and how long an unreachable server takes to fail.

Both through the real command line (`python -m mmft_hf.cli caption`) against the loopback chat server of
tests/fake_chat_server.py, on a small dataset of distinct images saved with `save_to_disk`.

1. Two identical runs started at once on the same data and the same caption cache. Baseline: one run alone pays
   exactly one request per caption. Printed: requests paid by the pair, distinct captions, captions paid twice,
   and the ratio paid / distinct (1.0 = never paid twice).
2. One run with default settings against `--base_url http://127.0.0.1:9/v1` (nothing listens there): its wall time,
   exit status and the last line it printed. Capped at `--unreachable_cap_s` (an older checkout retries for hours).

`--code_root DIR` runs the command from another checkout (e.g. a `git worktree` of an older commit) to measure the
figures before a change; the loopback server always comes from this checkout.

Run from the repository root:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/caption_edges.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]  # tests/ (the loopback API)

import datasets  # noqa: E402
from PIL import Image  # noqa: E402

from tests.fake_chat_server import start_fake_api, wait_until_quiet  # noqa: E402


def save_dataset(path: Path, rows: int) -> None:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["banded", "dotted"])})
    images = [Image.new("RGB", (32 + row, 24), (row % 256, 40, 200)) for row in range(rows)]
    datasets.Dataset.from_dict(
        {"image": images, "label": [row % 2 for row in range(rows)]}, features=features
    ).save_to_disk(str(path))


def command(code_root: Path, dataset: Path, cache: Path, base_url: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "mmft_hf.cli", "caption", "--dataset_name", str(dataset), "--captioner", "openai:fake",
        "--base_url", base_url, "--api_key_env", "none", "--domain", "textures", "--cache_dir", str(cache), *extra,
        "--output_dir", tempfile.mkdtemp(dir=cache.parent),  # one per run: the command needs a destination
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=60, help="images (x 3 caption types)")
    parser.add_argument("--delay", type=float, default=0.2, help="seconds per loopback request")
    parser.add_argument("--code_root", type=Path, default=ROOT, help="checkout whose mmft_hf runs the command")
    parser.add_argument("--unreachable_cap_s", type=float, default=120.0)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(args.code_root), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_dataset(tmp / "ds", args.rows)
        distinct = args.rows * 3

        server = start_fake_api(delay=args.delay)
        try:
            started = time.monotonic()
            runs = [
                subprocess.Popen(
                    command(args.code_root, tmp / "ds", tmp / "cache", server.base_url),
                    env=env,
                    cwd=args.code_root,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for _ in range(2)
            ]
            for run in runs:
                stdout, stderr = run.communicate()
                summary = next((line for line in stdout.splitlines() if "Captioned" in line), "")
                print(f"run exited {run.returncode} after {time.monotonic() - started:.1f} s: {summary}", flush=True)
                if run.returncode:
                    print(stderr[-2000:])
            paid = wait_until_quiet(server, quiet=1.0)
        finally:
            server.shutdown()
            server.server_close()
        print(
            f"two concurrent runs, {args.rows} images x 3 types: paid {paid} requests for {distinct} distinct "
            f"captions; {paid - distinct} paid twice; ratio paid/distinct {paid / distinct:.2f} (one run alone: 1.00)"
        )

        started = time.monotonic()
        try:
            result = subprocess.run(
                command(args.code_root, tmp / "ds", tmp / "cache2", "http://127.0.0.1:9/v1"),
                env=env,
                cwd=args.code_root,
                capture_output=True,
                text=True,
                timeout=args.unreachable_cap_s,
            )
            elapsed = time.monotonic() - started
            last = (result.stderr.strip().splitlines() or [""])[-1]
            print(f"unreachable server: exit {result.returncode} after {elapsed:.1f} s; last line: {last[:300]}")
        except subprocess.TimeoutExpired:
            print(f"unreachable server: still running after {args.unreachable_cap_s:.0f} s (killed)")


if __name__ == "__main__":
    main()
