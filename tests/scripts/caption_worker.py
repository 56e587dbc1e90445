"""Captions a dataset saved with `save_to_disk` through the OpenAI-compatible captioner (run by the kill and the
two-run tests).

Usage: caption_worker.py DATASET_DIR CACHE_DIR BASE_URL [--num_shards N --shard_index I] [--output DIR]
"""

import argparse

import datasets

from mmft_hf.captioning.caption import caption_dataset
from mmft_hf.captioning.captioners.openai_compatible import OpenAICompatibleCaptioner


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset_dir")
    parser.add_argument("cache_dir")
    parser.add_argument("base_url")
    parser.add_argument("--num_shards", type=int, default=1)
    parser.add_argument("--shard_index", type=int, default=0)
    parser.add_argument("--max_concurrency", type=int, default=2)
    parser.add_argument("--output", help="save the captioned dataset here (save_to_disk)")
    args = parser.parse_args()
    captioner = OpenAICompatibleCaptioner(
        model="fake-mllm",
        base_url=args.base_url,
        api_key_env=None,
        max_concurrency=args.max_concurrency,
        max_retries=0,
    )
    result = caption_dataset(
        datasets.load_from_disk(args.dataset_dir),
        captioner,
        domain="textures",
        cache_dir=args.cache_dir,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
        show_progress=False,
    )
    if args.output:
        result.save_to_disk(args.output)
    print(result.caption_summary)


if __name__ == "__main__":
    main()
