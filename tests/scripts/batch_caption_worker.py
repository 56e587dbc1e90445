"""Captions a dataset saved with `save_to_disk` through the Batch API captioner (run by the batch kill test).

Usage: batch_caption_worker.py DATASET_DIR CACHE_DIR BASE_URL
"""

import sys

import datasets

from mmft_hf.captioning.caption import caption_dataset
from mmft_hf.captioning.captioners.openai_batch import OpenAIBatchCaptioner


def main():
    dataset_dir, cache_dir, base_url = sys.argv[1:4]
    captioner = OpenAIBatchCaptioner(
        model="fake-mllm", base_url=base_url, api_key_env=None, poll_interval_s=0.05, max_retries=0
    )
    result = caption_dataset(
        datasets.load_from_disk(dataset_dir), captioner, domain="textures", cache_dir=cache_dir, show_progress=False
    )
    print(result.caption_summary)


if __name__ == "__main__":
    main()
