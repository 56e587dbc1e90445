"""Captioning throughput: API concurrency against a loopback server, and batched local VLM generation.

1. `OpenAICompatibleCaptioner` against tests/fake_chat_server.py with a fixed latency per request: N requests
   with `max_concurrency=1` (sequential) and with `max_concurrency=16`, plus a bare `AsyncOpenAI` + semaphore loop
   as the no-wrapper baseline. Target: >= 12x for 16-way concurrency (16x is the ideal).
2. `TransformersCaptioner` on the tiny random LLaVA (tests/tiny_vlm.py), greedy: 16 images in one batch of 16
   against one at a time (medians of several runs). Tiny models are overhead-bound; real VLMs gain less.

Run from the repository root:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/captioning_throughput.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the package (also when not installed) and the test helpers

from fake_chat_server import start_fake_api  # noqa: E402
from PIL import Image  # noqa: E402

from mmft_hf.captioning.captioners import CaptionRequest, OpenAICompatibleCaptioner, TransformersCaptioner  # noqa: E402
from mmft_hf.captioning.captioners.images import image_to_data_url, prepare_image  # noqa: E402


def make_requests(count: int, side: int = 256) -> list[CaptionRequest]:
    return [
        CaptionRequest(
            Image.new("RGB", (side, side - i % 7), (i * 3 % 256, 120, 60)), f"Describe photo {i} in 50 words."
        )
        for i in range(count)
    ]


def timed_captions(captioner, requests) -> tuple[float, int]:
    start = time.perf_counter()
    ok = sum(result.text is not None for _, result in captioner.caption(requests))
    return time.perf_counter() - start, ok


async def bare_sdk(base_url: str, requests: list[CaptionRequest], concurrency: int) -> None:
    from openai import AsyncOpenAI

    semaphore = asyncio.Semaphore(concurrency)
    async with AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0) as client:

        async def one(request: CaptionRequest) -> str:
            async with semaphore:
                url = image_to_data_url(prepare_image(request.image, 768))
                content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": request.prompt}]
                response = await client.chat.completions.create(
                    model="fake", messages=[{"role": "user", "content": content}], max_tokens=256
                )
                return response.choices[0].message.content

        await asyncio.gather(*(one(request) for request in requests))


def api_benchmark(num_requests: int, latency: float, concurrency: int) -> None:
    server = start_fake_api(delay=latency)
    try:
        requests = make_requests(num_requests)

        def captioner(max_concurrency):
            return OpenAICompatibleCaptioner(
                "fake", base_url=server.base_url, api_key_env=None, max_concurrency=max_concurrency
            )

        timed_captions(captioner(concurrency), requests[:concurrency])  # warm-up: imports, platform probe
        sequential, ok_seq = timed_captions(captioner(1), requests)
        # A fresh captioner sends its first request alone (to fail fast on a server that cannot answer): a fixed
        # cost of one latency per run. A captioner whose server has answered sends at full concurrency at once.
        concurrent, ok_conc = timed_captions(captioner(concurrency), requests)
        answered = captioner(concurrency)
        timed_captions(answered, requests[:1])
        steady, ok_steady = timed_captions(answered, requests)
        start = time.perf_counter()
        asyncio.run(bare_sdk(server.base_url, requests, concurrency))
        bare = time.perf_counter() - start
    finally:
        server.shutdown()
        server.server_close()
    assert ok_seq == ok_conc == ok_steady == num_requests, (ok_seq, ok_conc, ok_steady)
    print(f"API captioner, {num_requests} requests, {latency * 1000:.0f} ms latency each (loopback server)")
    print(f"  max_concurrency=1         : {sequential:6.2f} s  {num_requests / sequential:7.1f} captions/s")
    print(f"  max_concurrency={concurrency:<10}: {concurrent:6.2f} s  {num_requests / concurrent:7.1f} captions/s")
    print(f"  ... server already answered: {steady:6.2f} s  {num_requests / steady:7.1f} captions/s")
    print(f"  bare AsyncOpenAI, sem={concurrency:<4}: {bare:6.2f} s  {num_requests / bare:7.1f} captions/s")
    print(
        f"  speed-up concurrent/sequential: {sequential / concurrent:.1f}x fresh, {sequential / steady:.1f}x once the "
        f"server has answered (ideal {concurrency}x)"
    )
    print(
        f"  captioner vs bare SDK loop    : {bare / concurrent:.2f}x the bare loop's rate (fresh captioner: its first"
    )
    print(f"                                  request goes alone), {bare / steady:.2f}x once the server has answered")


def vlm_benchmark(num_images: int, max_new_tokens: int, repeats: int) -> None:
    from tiny_vlm import save_tiny_vlm

    with tempfile.TemporaryDirectory() as directory:
        save_tiny_vlm(directory)
        requests = make_requests(num_images, side=64)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, device="cpu")
        batched = TransformersCaptioner(directory, batch_size=num_images, **kwargs)
        single = TransformersCaptioner(directory, batch_size=1, **kwargs)
        timed_captions(batched, requests)  # warm-up
        timed_captions(single, requests)
        batched_times = [timed_captions(batched, requests)[0] for _ in range(repeats)]
        single_times = [timed_captions(single, requests)[0] for _ in range(repeats)]
    batched_s, single_s = statistics.median(batched_times), statistics.median(single_times)
    print(f"Tiny LLaVA (CPU, greedy, {max_new_tokens} new tokens), {num_images} images, median of {repeats}")
    print(f"  {'one at a time (batch_size=1)':<30}: {single_s:6.3f} s  {num_images / single_s:7.1f} captions/s")
    print(
        f"  {f'batched (batch_size={num_images})':<30}: {batched_s:6.3f} s  {num_images / batched_s:7.1f} captions/s"
    )
    print(f"  speed-up batched/one-at-a-time: {single_s / batched_s:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_requests", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--num_images", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    api_benchmark(args.num_requests, args.latency, args.concurrency)
    vlm_benchmark(args.num_images, args.max_new_tokens, args.repeats)


if __name__ == "__main__":
    main()
