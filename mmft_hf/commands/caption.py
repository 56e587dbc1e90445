"""Caption a labelled image dataset with an MLLM for MMFT, then save it in the Hub layout or push it.

Examples:

```bash
# a benchmark preset through an OpenAI-compatible API (Gemini here), written to a local Hub-layout folder
GEMINI_API_KEY=... python examples/generate_captions.py --preset dtd --captioner openai:gemini-2.5-flash-lite \
    --base_url https://generativelanguage.googleapis.com/v1beta/openai/ --api_key_env GEMINI_API_KEY \
    --output_dir captioned-dtd

# any dataset with a local VLM, pushed to the Hub
python examples/generate_captions.py --dataset_name org/my-images --domain flowers \
    --captioner transformers:Qwen/Qwen3.5-4B --push_to_hub --hub_repo_id me/captioned-flowers

# a local OpenAI-compatible server (vLLM, llama.cpp) needs no key; GTSRB with descriptive names, one per line
python examples/generate_captions.py --preset gtsrb --captioner openai:Qwen/Qwen3-VL-8B-Instruct \
    --base_url http://localhost:8000/v1 --api_key_env none --class_names gtsrb_names.txt --output_dir captioned-gtsrb

# two machines: each captions a shard into its own copy of the cache ... or all into one shared cache directory.
# Then rerun without --num_shards: every caption is a cache hit, and the full dataset is written.
python examples/generate_captions.py ... --num_shards 2 --shard_index 0 --cache_dir /shared/captions
```
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import datasets
from transformers import HfArgumentParser

from mmft_hf.captioning.builder import PRESETS, make_captioner, push_captioned
from mmft_hf.captioning.caption import caption_dataset
from mmft_hf.captioning.prompts import CAPTION_TYPES, DEFAULT_WORDS, PROMPT_TEMPLATE

logger = logging.getLogger("generate_captions")


@dataclass
class CaptioningArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub id, local data dir or save_to_disk dir."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The source dataset's config."})
    preset: str | None = field(default=None, metadata={"help": f"A benchmark preset: {', '.join(PRESETS)}."})
    split: list[str] | None = field(default=None, metadata={"help": "Split(s) to caption (default: all)."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: image)."})
    label_column: str | None = field(default=None, metadata={"help": "ClassLabel column (default: label)."})
    domain: str | None = field(default=None, metadata={"help": "The prompt's domain word, e.g. textures."})
    class_names: str | None = field(
        default=None,
        metadata={
            "help": "A text file with one class name per line, in label-id order, overriding the source's names "
            "(e.g. CLIP's descriptive GTSRB or ImageNet names)."
        },
    )
    captioner: str = field(
        default="openai:gemini-2.5-flash-lite", metadata={"help": "openai:MODEL or transformers:MODEL_OR_PATH."}
    )
    base_url: str | None = field(default=None, metadata={"help": "API root of an OpenAI-compatible server."})
    api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata={"help": "Environment variable with the API key; 'none' (or '') for a local server without one."},
    )
    max_concurrency: int = field(default=16, metadata={"help": "API requests in flight."})
    batch_size: int = field(default=8, metadata={"help": "Images per generate() call (transformers backend)."})
    temperature: float = field(default=0.2, metadata={"help": "Sampling temperature (both backends)."})
    max_tokens: int = field(default=256, metadata={"help": "Caption token limit (both backends)."})
    caption_types: list[str] = field(
        default_factory=lambda: list(CAPTION_TYPES), metadata={"help": "Characteristics."}
    )
    captions_per_type: int = field(default=1, metadata={"help": "Captions per image and type."})
    words: int = field(default=DEFAULT_WORDS, metadata={"help": "Requested caption length in words."})
    prompt_template: str = field(default=PROMPT_TEMPLATE, metadata={"help": "Custom template with {class_name}."})
    num_shards: int = field(default=1, metadata={"help": "Split the work into this many contiguous shards."})
    shard_index: int = field(default=0, metadata={"help": "The shard this process captions."})
    cache_dir: str | None = field(default=None, metadata={"help": "Caption cache dir (default $HF_HOME/mmft_hf)."})
    max_passes: int = field(default=3, metadata={"help": "Passes over captions that failed."})
    strict: bool = field(default=False, metadata={"help": "Fail (listing them) when captions are missing."})
    output_dir: str | None = field(default=None, metadata={"help": "Write the Hub layout (Parquet + card) here."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the captioned dataset to --hub_repo_id."})
    hub_repo_id: str | None = field(default=None, metadata={"help": "Dataset repo id, e.g. me/captioned-dtd."})
    license: str | None = field(default=None, metadata={"help": "Licence id for the card (must suit the source)."})


def load_source(args: CaptioningArguments) -> datasets.DatasetDict:
    name = args.dataset_name or (PRESETS[args.preset].source if args.preset else None)
    if not name:
        raise ValueError("Give --dataset_name or --preset.")
    if os.path.isdir(name) and any(os.path.exists(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json")):
        source = datasets.load_from_disk(name)
    else:
        source = datasets.load_dataset(name, args.dataset_config_name)
    if isinstance(source, datasets.Dataset):
        source = datasets.DatasetDict({"train": source})
    return source


def read_class_names(path: str) -> list[str]:
    """Reads one class name per line of a UTF-8 text file, in label-id order (line `i` names label `i`)."""
    with open(path, encoding="utf-8") as handle:
        names = [line.strip() for line in handle.read().rstrip().splitlines()]
    if not names or not all(names):
        raise ValueError(f"--class_names file {path!r} needs one class name per line, without blank lines.")
    return names


def captioner_kwargs(args: CaptioningArguments) -> dict:
    """The backend keyword arguments for `make_captioner(args.captioner, ...)`."""
    if args.captioner.partition(":")[0] == "openai":
        return dict(
            base_url=args.base_url,
            api_key_env=None if args.api_key_env.strip().lower() in ("", "none") else args.api_key_env,
            max_concurrency=args.max_concurrency,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
        )
    return dict(batch_size=args.batch_size, temperature=args.temperature, max_new_tokens=args.max_tokens)


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(CaptioningArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.preset and args.preset not in PRESETS:
        raise ValueError(f"Unknown preset {args.preset!r}; choose from {list(PRESETS)}.")
    preset = PRESETS[args.preset] if args.preset else None
    domain = args.domain or (preset.domain if preset else None)
    if not domain:
        raise ValueError("Give --domain (the prompt's domain word) or --preset.")
    source = load_source(args)
    splits = args.split or (list(preset.splits) if preset and not args.dataset_name else list(source))
    class_names = read_class_names(args.class_names) if args.class_names else None
    captioner = make_captioner(args.captioner, **captioner_kwargs(args))
    captioned, summaries = {}, {}
    for split in splits:
        result = caption_dataset(
            source[split],
            captioner,
            domain=domain,
            caption_types=args.caption_types,
            captions_per_type=args.captions_per_type,
            image_column=args.image_column or (preset.image_column if preset else "image"),
            label_column=args.label_column or (preset.label_column if preset else "label"),
            class_names=class_names,
            prompt_template=args.prompt_template,
            words=args.words,
            cache_dir=args.cache_dir,
            num_shards=args.num_shards,
            shard_index=args.shard_index,
            strict=args.strict,
            max_passes=args.max_passes,
        )
        captioned[split], summaries[split] = result, result.caption_summary
        print(f"[{split}] {result.caption_summary}")
    dataset_dict = datasets.DatasetDict(captioned)
    if args.num_shards > 1:
        # a shard is an intermediate result: keep it with save_to_disk; rerun unsharded to publish (cache hits)
        if args.output_dir:
            path = os.path.join(args.output_dir, f"shard-{args.shard_index:05d}-of-{args.num_shards:05d}")
            dataset_dict.save_to_disk(path)
            print(f"Saved shard to {path}; rerun without --num_shards to merge (every caption is cached).")
        return summaries
    source_name = args.dataset_name or (preset.source if preset else None)
    if args.output_dir:
        print(
            "Wrote",
            push_captioned(dataset_dict, os.path.abspath(args.output_dir), source=source_name, license=args.license),
        )
    if args.push_to_hub:
        if not args.hub_repo_id:
            raise ValueError("--push_to_hub needs --hub_repo_id org/name.")
        print("Pushed", push_captioned(dataset_dict, args.hub_repo_id, source=source_name, license=args.license))
    return summaries


if __name__ == "__main__":
    main()
