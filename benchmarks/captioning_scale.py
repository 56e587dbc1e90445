"""Captioning at scale: per-type vs one request per image, and a Batch API run vs synchronous requests.

Both against the loopback OpenAI API of tests/fake_batch_api.py, which reports usage from the request the way
OpenAI counts it: prompt words plus 85 + 170 tokens per 512 x 512 tile of the image, and the answer's words.

1. Per-type (the paper's protocol, 3 requests per image) vs `one_request_per_image=True` (one JSON request per
   image) on the same images, synchronous at `max_concurrency=16`: requests, input and output tokens per image,
   wall time. The image is most of the input, so the joint mode pays it once instead of three times.
2. The same per-type captions through `OpenAIBatchCaptioner` (write JSONL, upload, create, poll, download, store)
   vs `OpenAICompatibleCaptioner` at concurrency 16 with a fixed latency per chat request. The loopback batch
   engine answers every line at once, so the batch time here is the client machinery only; a real provider takes
   minutes to hours (within the 24 h window). What a batch buys is the price (50 %) and the rate limits, not
   latency; the number to read is that the machinery adds little, and that no chat request is made.

Run from the repository root:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/captioning_scale.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]  # the package (also when not installed) and tests/ (the loopback API)

import datasets  # noqa: E402
from PIL import Image  # noqa: E402

from mmft_hf.captioning.caption import caption_dataset  # noqa: E402
from mmft_hf.captioning.captioners import OpenAIBatchCaptioner, OpenAICompatibleCaptioner  # noqa: E402
from tests.fake_batch_api import start_fake_batch_api  # noqa: E402

CLASSES = ["banded", "dotted", "striped", "woven"]


def make_dataset(num_images: int, size: tuple[int, int]) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    images = [Image.new("RGB", size, (i * 7 % 256, 90, 160)) for i in range(num_images)]
    return datasets.Dataset.from_dict(
        {"image": images, "label": [i % len(CLASSES) for i in range(num_images)]}, features=features
    )


def run(dataset, captioner, cache_dir, **kwargs):
    start = time.perf_counter()
    result = caption_dataset(dataset, captioner, domain="textures", cache_dir=cache_dir, show_progress=False, **kwargs)
    seconds = time.perf_counter() - start
    summary = result.caption_summary
    assert not summary.failures, summary.failures[:3]
    return summary, seconds


def joint_vs_per_type(dataset, latency: float) -> None:
    print(f"1. Per-type vs one request per image: {len(dataset)} images of {dataset[0]['image'].size}, concurrency 16")
    rows = {}
    for name, joint in (("per-type", False), ("joint", True)):
        server = start_fake_batch_api()
        server.delay = latency
        try:
            captioner = OpenAICompatibleCaptioner("fake-vlm", base_url=server.base_url, api_key_env=None)
            with tempfile.TemporaryDirectory() as cache_dir:
                summary, seconds = run(dataset, captioner, cache_dir, one_request_per_image=joint)
            assert summary.captions_done == 3 * len(dataset)
            rows[name] = (
                summary.requests / len(dataset),
                summary.usage["prompt_tokens"] / len(dataset),
                summary.usage["completion_tokens"] / len(dataset),
                seconds,
            )
        finally:
            server.shutdown()
            server.server_close()
    print(f"   {'mode':10s} {'requests/img':>13s} {'input tok/img':>14s} {'output tok/img':>15s} {'wall s':>8s}")
    for name, (requests, inputs, outputs, seconds) in rows.items():
        print(f"   {name:10s} {requests:13.2f} {inputs:14.1f} {outputs:15.1f} {seconds:8.2f}")
    per_type, joint = rows["per-type"], rows["joint"]
    print(
        f"   joint / per-type: requests {joint[0] / per_type[0]:.3f}, input tokens {joint[1] / per_type[1]:.3f}, "
        f"output tokens {joint[2] / per_type[2]:.3f}, total tokens "
        f"{(joint[1] + joint[2]) / (per_type[1] + per_type[2]):.3f}, wall time {joint[3] / per_type[3]:.3f}"
    )


def batch_vs_sync(dataset, latency: float, poll_interval_s: float) -> None:
    print(f"2. Batch API vs synchronous: {3 * len(dataset)} captions, chat latency {latency * 1000:.0f} ms")
    timings = {}
    for name in ("sync, concurrency 16", "batch"):
        server = start_fake_batch_api()
        server.delay = latency
        try:
            if name == "batch":
                captioner = OpenAIBatchCaptioner(
                    "fake-vlm", base_url=server.base_url, api_key_env=None, poll_interval_s=poll_interval_s
                )
            else:
                captioner = OpenAICompatibleCaptioner(
                    "fake-vlm", base_url=server.base_url, api_key_env=None, max_concurrency=16
                )
            with tempfile.TemporaryDirectory() as cache_dir:
                summary, seconds = run(dataset, captioner, cache_dir)
            timings[name] = seconds
            print(
                f"   {name:22s} {seconds:7.2f} s   chat requests {len(server.requests):4d}   batches "
                f"{len(server.created)}   polls {len(server.retrieves)}   tokens {summary.usage.get('total_tokens')}"
            )
        finally:
            server.shutdown()
            server.server_close()
    print(f"   batch / sync wall time: {timings['batch'] / timings['sync, concurrency 16']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=96)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--latency", type=float, default=0.05, help="Seconds per chat request on the server.")
    parser.add_argument("--poll_interval_s", type=float, default=0.2)
    args = parser.parse_args()
    dataset = make_dataset(args.num_images, (args.width, args.height))
    joint_vs_per_type(dataset, args.latency)
    batch_vs_sync(dataset, args.latency, args.poll_interval_s)


if __name__ == "__main__":
    main()
