"""Captions a dataset saved with `save_to_disk` through the OpenAI-compatible captioner (run by the kill test).

Usage: caption_worker.py DATASET_DIR CACHE_DIR BASE_URL [NUM_SHARDS SHARD_INDEX]
"""

import sys

import datasets

from mmft_hf.captioning.caption import caption_dataset
from mmft_hf.captioning.captioners.openai_compatible import OpenAICompatibleCaptioner


def main():
    dataset_dir, cache_dir, base_url = sys.argv[1:4]
    num_shards, shard_index = (int(sys.argv[4]), int(sys.argv[5])) if len(sys.argv) > 5 else (1, 0)
    captioner = OpenAICompatibleCaptioner(
        model="fake-mllm", base_url=base_url, api_key_env=None, max_concurrency=2, max_retries=0
    )
    result = caption_dataset(
        datasets.load_from_disk(dataset_dir),
        captioner,
        domain="textures",
        cache_dir=cache_dir,
        num_shards=num_shards,
        shard_index=shard_index,
        show_progress=False,
    )
    print(result.caption_summary)


if __name__ == "__main__":
    main()
