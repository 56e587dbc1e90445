"""What does the benchmark's data identity cost? `dataset_settings` (the sweep fingerprint's dataset facts: for a
local dataset `content_sha256` of every split, image bytes included, and `captions_sha256`) on a local dataset of
`--num_images` small images, next to what the same command pays anyway and to the least a content hash must do.

Data, written to a temporary directory: `--num_images` training images (`--size` pixels square, JPEG, smooth colour
plus noise so that they compress like photos) and a fifth as many test images, four classes, three captions each,
in the two local layouts `mmft-hf benchmark --dataset NAME=DIR` reads:

- parquet: Hub-layout Parquet shards (`DIR/data/<split>-00000-of-00001.parquet`), image bytes embedded;
- imagefolder: `DIR/<split>/<class>/<n>.jpg` plus `metadata.jsonl` (the captions), the images stored as paths.

Per layout, in the same run: `load_dataset(DIR)` (every benchmark call pays it; the second, cached, load is shown),
the bare baseline (sha256 of the dataset's files read from disk: the bytes any content hash must read at least once),
and `dataset_settings` (called twice: a cache would show in the second call); then the whole user-facing command,
`mmft-hf benchmark --dataset NAME=DIR --methods zeroshot,mmft --dry_run true` (cached load, fingerprints, cell
list). The ratios are against the cached load and against the bare hash; the last figure is the fingerprint's share
of the dry run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_identity_hash.py --num_images 5000
"""

import argparse
import contextlib
import hashlib
import io
import json
import os
import tempfile
import time

import datasets
import numpy as np
from PIL import Image

from mmft_hf.commands import benchmark
from mmft_hf.evaluation import dataset_settings

CLASS_NAMES = ["banded", "dotted", "striped", "woven"]


def jpeg_bytes(rng: np.random.Generator, size: int) -> bytes:
    base = rng.integers(0, 255, size=(4, 4, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(base).resize((size, size), Image.BICUBIC), dtype=np.int16)
    pixels = np.clip(field + rng.integers(-20, 20, size=field.shape), 0, 255).astype(np.uint8)
    path = tempfile.SpooledTemporaryFile()
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    path.seek(0)
    return path.read()


def write_layouts(root: str, num_images: int, size: int) -> dict[str, str]:
    """Writes the same rows as Parquet shards and as an image folder; returns {layout: directory}."""
    rng = np.random.default_rng(0)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=CLASS_NAMES),
            "captions": datasets.List(datasets.Value("string")),
        }
    )
    parquet, folder = os.path.join(root, "parquet"), os.path.join(root, "imagefolder")
    for split, count in (("train", num_images), ("test", max(1, num_images // 5))):
        rows = {"image": [], "label": [], "captions": []}
        metadata = []
        for index in range(count):
            label = index % len(CLASS_NAMES)
            data = jpeg_bytes(rng, size)
            name = CLASS_NAMES[label]
            captions = [f"a {name} surface number {index}", f"the {name} pattern repeats", f"{name} texture"]
            rows["image"].append({"bytes": data, "path": None})
            rows["label"].append(label)
            rows["captions"].append(captions)
            relative = os.path.join(name, f"{index:05d}.jpg")
            os.makedirs(os.path.join(folder, split, name), exist_ok=True)
            with open(os.path.join(folder, split, relative), "wb") as handle:
                handle.write(data)
            metadata.append({"file_name": relative, "captions": captions})
        dataset = datasets.Dataset.from_dict(rows, features=features)
        dataset.to_parquet(os.path.join(parquet, "data", f"{split}-00000-of-00001.parquet"))
        with open(os.path.join(folder, split, "metadata.jsonl"), "w") as handle:
            handle.writelines(json.dumps(line) + "\n" for line in metadata)
    return {"parquet": parquet, "imagefolder": folder}


def timed(function):
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def bare_file_hash(directory: str) -> str:
    """sha256 of every file under `directory`, in sorted order, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    for folder, subfolders, names in sorted(os.walk(directory)):
        subfolders.sort()
        for name in sorted(names):
            with open(os.path.join(folder, name), "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
    return digest.hexdigest()


def measure(layout: str, directory: str, cache: str, output_dir: str) -> str:
    """One layout's line of figures."""
    megabytes = sum(
        os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(directory) for name in names
    ) / 2**20  # fmt: skip
    _, first_load = timed(lambda: datasets.load_dataset(directory, cache_dir=cache))
    raw, load = timed(lambda: datasets.load_dataset(directory, cache_dir=cache))
    _, bare = timed(lambda: bare_file_hash(directory))
    facts, first = timed(lambda: dataset_settings(raw, source=directory))
    again, second = timed(lambda: dataset_settings(raw, source=directory))
    assert facts == again and "content_sha256" in facts
    dry_run = ["--dataset", f"{layout}={directory}", "--methods", "zeroshot,mmft", "--shots", "4", "--seeds", "1",
               "--cache_dir", cache, "--output_dir", output_dir, "--use_cpu", "true", "--dry_run", "true"]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        _, command = timed(lambda: benchmark.main(dry_run))
    rows = sum(len(split) for split in raw.values())
    return (f"{layout}: {rows} rows, {megabytes:.1f} MiB on disk | load_dataset {first_load:.2f} s first, {load:.2f} s "
            f"cached | bare file hash {bare:.3f} s | dataset_settings {first:.3f} s, again {second:.3f} s | "
            f"dataset_settings/cached load {second / load:.2f}x, /bare hash {second / bare:.2f}x | benchmark "
            f"--dry_run {command:.2f} s, fingerprint share {second / command:.0%}")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=5000, help="Training images (test: a fifth as many).")
    parser.add_argument("--size", type=int, default=64, help="Image side in pixels.")
    parser.add_argument("--layouts", nargs="*", default=["parquet", "imagefolder"])
    args = parser.parse_args()
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as root:
        layouts = write_layouts(root, args.num_images, args.size)
        for layout in args.layouts:
            print(measure(layout, layouts[layout], os.path.join(root, "hf-cache"), os.path.join(root, "out")))


if __name__ == "__main__":
    main()
