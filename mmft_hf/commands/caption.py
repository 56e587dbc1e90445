r"""Caption a labelled image dataset with an MLLM for MMFT, then save it in the Hub layout or push it.

Examples:

```bash
# a benchmark preset through an OpenAI-compatible API (Gemini here), written to a local Hub-layout folder
GEMINI_API_KEY=... mmft-hf caption --preset dtd --captioner openai:gemini-2.5-flash-lite \
    --base_url https://generativelanguage.googleapis.com/v1beta/openai/ --api_key_env GEMINI_API_KEY \
    --output_dir captioned-dtd

# any dataset with a local VLM, pushed to the Hub
mmft-hf caption --dataset_name org/my-images --domain flowers \
    --captioner transformers:Qwen/Qwen3.5-4B --push_to_hub --hub_repo_id me/captioned-flowers

# a local OpenAI-compatible server (vLLM, llama.cpp) needs no key; GTSRB with descriptive names, one per line
mmft-hf caption --preset gtsrb --captioner openai:Qwen/Qwen3-VL-8B-Instruct \
    --base_url http://localhost:8000/v1 --api_key_env none --class_names gtsrb_names.txt --output_dir captioned-gtsrb

# several captioners: each image gets every caption type from each; `caption_sources` names each caption's model;
# flags apply to every captioner, a spec's own ,key=value settings to that one (docs/scaling.md §5)
mmft-hf caption --preset dtd --output_dir captioned-dtd --captioner openai:gpt-4o-mini \
    --captioner 'openai:Qwen/Qwen3-VL-8B-Instruct,base_url=http://localhost:8000/v1,api_key_env=none'

# two machines: each captions a shard into its own copy of the cache ... or all into one shared cache directory.
# Then rerun without --num_shards: every caption is a cache hit, and the full dataset is written.
mmft-hf caption ... --num_shards 2 --shard_index 0 --cache_dir /shared/captions

# at scale (docs/scaling.md): know the bill first, then pay half through the provider's Batch API (a rerun after an
# interruption polls the same batch), optionally with one request per image for all caption types
mmft-hf caption --preset dtd --captioner openai-batch:gpt-4o-mini --estimate_only \
    --price_per_million_input_tokens 0.15 --price_per_million_output_tokens 0.6
mmft-hf caption --preset dtd --captioner openai-batch:gpt-4o-mini --one_request_per_image --output_dir captioned-dtd

# an offline engine: export the requests, run `vllm run-batch`, import the results, write the dataset
mmft-hf caption --preset dtd --split train --captioner openai:Qwen/Qwen3-VL-8B-Instruct --export_requests requests.jsonl
mmft-hf caption --preset dtd --split train --captioner openai:Qwen/Qwen3-VL-8B-Instruct --import_results results.jsonl \
    --base_url http://localhost:8000/v1 --api_key_env none --output_dir captioned-dtd
```
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field, replace

import datasets

from mmft_hf.captioning.builder import PRESETS, make_captioner, push_captioned
from mmft_hf.captioning.cache import CaptionCacheError, default_cache_dir
from mmft_hf.captioning.caption import CaptioningError, CaptioningInterrupted, caption_dataset
from mmft_hf.captioning.captioners.base import CaptionerUnavailableError
from mmft_hf.captioning.engine import OpenBatchError
from mmft_hf.captioning.offline import export_caption_requests, import_caption_results
from mmft_hf.captioning.prompts import (
    CAPTION_TYPES,
    DEFAULT_WORDS,
    PROMPT_TEMPLATE,
    read_class_names,
    validate_caption_types,
)
from mmft_hf.captioning.provenance import caption_source
from mmft_hf.captioning.stats import estimate_captioning_cost
from mmft_hf.commands.flags import command_parser, errors_in_flags, flag_names

logger = logging.getLogger("generate_captions")
DEFAULT_CAPTIONER = "openai:gemini-2.5-flash-lite"
# the settings (and their types) one captioner of several may set for itself in its --captioner spec (`,key=value`)
SPEC_OPTIONS = {
    "base_url": str,
    "api_key_env": str,
    "max_concurrency": int,
    "batch_size": int,
    "temperature": float,
    "max_tokens": int,
    "timeout": float,
    "max_retries": int,
    "max_answer_retries": int,
    "max_consecutive_connection_errors": int,
    "extra_body": str,
    "image_format": str,
    "max_image_side": int,
    "cache_tag": str,
}


@dataclass
class CaptioningArguments:
    _argument_group_name = "captioning"  # a heading in --help

    dataset_name: str | None = field(default=None, metadata={"help": "Hub id, local data dir or save_to_disk dir."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The source dataset's config."})
    preset: str | None = field(default=None, metadata={"help": f"A benchmark preset: {', '.join(PRESETS)}."})
    split: list[str] = field(
        default_factory=lambda: ["train"],
        metadata={
            "help": "Split(s) to caption. MMFT reads the training captions only (prototypes come from the training "
            "images), so other splits are written without captions unless named here."
        },
    )
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
    captioner: list[str] = field(
        default_factory=list,
        metadata={
            "action": "extend",
            "help": f"openai:MODEL, openai-batch:MODEL (the provider's Batch API) or transformers:MODEL_OR_PATH "
            f"(default {DEFAULT_CAPTIONER}). Repeat it (or give several) to caption every image with each: the "
            "dataset gets a caption_sources column naming each caption's captioner. The flags below apply to every "
            "captioner; one captioner's own settings follow its spec as ,key=value pairs, e.g. --captioner "
            "openai:gpt-4o-mini --captioner 'openai:Qwen/Qwen3-VL-8B-Instruct,base_url=http://localhost:8000/v1,"
            "api_key_env=none' (keys: " + ", ".join(SPEC_OPTIONS) + ").",
        },
    )
    base_url: str | None = field(default=None, metadata={"help": "API root of an OpenAI-compatible server."})
    api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata={"help": "Environment variable with the API key; 'none' (or '') for a local server without one."},
    )
    max_concurrency: int = field(default=16, metadata={"help": "API requests in flight."})
    batch_size: int = field(default=8, metadata={"help": "Images per generate() call (transformers backend)."})
    temperature: float = field(default=0.2, metadata={"help": "Sampling temperature (both backends)."})
    max_tokens: int = field(
        default=256,
        metadata={
            "help": "Caption token limit (both backends). An answer it cuts is asked again with it doubled (up to 4x); "
            "raise it if the summary reports many cut answers."
        },
    )
    # OpenAI-compatible API options (openai: and openai-batch: captioners); unset = the captioner's default
    timeout: float | None = field(default=None, metadata={"help": "Seconds per HTTP attempt (default 60)."})
    max_retries: int | None = field(
        default=None,
        metadata={"help": "Retries per request for 408/429/5xx, timeouts and connection errors (default 5)."},
    )
    max_answer_retries: int | None = field(
        default=None,
        metadata={"help": "Times an unusable answer (empty, refused, cut, far too long) is asked again (default 2)."},
    )
    max_consecutive_connection_errors: int | None = field(
        default=None,
        metadata={
            "help": "Stop after this many failures in a row: timed-out attempts, or requests left with connection or "
            "server errors (5xx, 429) after their retries (default 3)."
        },
    )
    extra_body: str | None = field(
        default=None,
        metadata={
            "help": 'JSON merged into every request body, e.g. \'{"reasoning_effort": "none"}\' (Gemini) or '
            '\'{"chat_template_kwargs": {"enable_thinking": false}}\' (vLLM). Part of the cache identity.'
        },
    )
    image_format: str | None = field(default=None, metadata={"help": "JPEG (default, smaller) or PNG (lossless)."})
    max_image_side: int | None = field(
        default=None, metadata={"help": "Downscale images to this longer side (default 768); 0 sends full size."}
    )
    cache_tag: str | None = field(
        default=None, metadata={"help": "Label kept in the cache identity, for deployments sharing a model name."}
    )
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
    allow_missing: bool = field(
        default=False,
        metadata={
            "help": "Write or push the dataset even when captions are still missing for server or answer reasons "
            "after all passes (by default the run fails and writes nothing; rows with unreadable images are kept "
            "either way)."
        },
    )
    output_dir: str | None = field(default=None, metadata={"help": "Write the Hub layout (Parquet + card) here."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the captioned dataset to --hub_repo_id."})
    hub_repo_id: str | None = field(default=None, metadata={"help": "Dataset repo id, e.g. me/captioned-dtd."})
    license: str | None = field(default=None, metadata={"help": "Licence id for the card (must suit the source)."})
    # captioning at scale (docs/scaling.md)
    one_request_per_image: bool = field(
        default=False, metadata={"help": "Ask for every caption type of an image in one JSON request."}
    )
    completion_window: str = field(default="24h", metadata={"help": "Batch completion window (openai-batch)."})
    poll_interval_s: float = field(default=30.0, metadata={"help": "Seconds between batch status checks."})
    max_requests_per_batch: int = field(default=50_000, metadata={"help": "Requests per batch (openai-batch)."})
    batch_retry: str = field(
        default="batch", metadata={"help": "How failed batch requests are retried: 'batch' (a new batch) or 'sync'."}
    )
    export_requests: str | None = field(
        default=None,
        metadata={
            "help": "Write the missing captions' requests as Batch API JSONL to this file (one file per split: "
            "FILE-SPLIT.jsonl when there are several) for an offline engine such as `vllm run-batch`, then stop."
        },
    )
    import_results: list[str] | None = field(
        default=None,
        metadata={"help": "Batch API result JSONL file(s) to read into the cache before captioning."},
    )
    estimate_only: bool = field(
        default=False, metadata={"help": "Caption a small sample and print the estimated requests, tokens and cost."}
    )
    estimate_sample_rows: int = field(default=20, metadata={"help": "Rows captioned for --estimate_only."})
    estimate_seed: int = field(
        default=0, metadata={"help": "Seeds the --estimate_only sample (another seed samples other rows)."}
    )
    price_per_million_input_tokens: float = field(default=0.0, metadata={"help": "Input price, for the estimate."})
    price_per_million_output_tokens: float = field(default=0.0, metadata={"help": "Output price, for the estimate."})
    batch_discount: float = field(default=0.5, metadata={"help": "Fraction of the price a Batch API takes off."})


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


API_OPTIONS = (
    "timeout",
    "max_retries",
    "max_answer_retries",
    "max_consecutive_connection_errors",
    "extra_body",
    "image_format",
    "max_image_side",
    "cache_tag",
)


def api_options(args: CaptioningArguments) -> dict:
    """The OpenAI-compatible captioner options given on the command line (the unset ones are left out)."""
    options = {name: getattr(args, name) for name in API_OPTIONS if getattr(args, name) is not None}
    if "extra_body" in options:
        try:
            options["extra_body"] = json.loads(options["extra_body"])
        except json.JSONDecodeError as error:
            raise ValueError(f"--extra_body must be a JSON object: {error} in {args.extra_body!r}.") from None
        if not isinstance(options["extra_body"], dict):
            raise ValueError(f"--extra_body must be a JSON object ({{...}}), got {args.extra_body!r}.")
    if options.get("max_image_side") == 0:
        options["max_image_side"] = None  # full size
    return options


def parse_caption_types(values: list[str]) -> list[str]:
    """`--caption_types shape texture` or `--caption_types shape,texture`: the characteristics, checked.

    Raises:
        `ValueError`: for an empty or repeated characteristic, before anything is requested.
    """
    types = []
    for value in values:
        for part in value.split(","):
            if not part.strip():
                raise ValueError(
                    f"--caption_types has an empty characteristic in {value!r}: separate characteristics with spaces "
                    "or commas, e.g. --caption_types shape texture."
                )
            types.append(part.strip())
    if len(set(types)) != len(types):
        raise ValueError(f"--caption_types names a characteristic twice: {types}.")
    return list(validate_caption_types(types))


def quiet_http_loggers() -> None:
    """One line per request (`HTTP Request: POST ...`, the SDK's retries) would scroll the progress bar away."""
    for name in ("httpx2", "httpx", "openai"):  # openai 3 sends through httpx2, older versions through httpx
        logging.getLogger(name).setLevel(logging.WARNING)


def parse_captioner_spec(value: str, args: CaptioningArguments) -> tuple[str, CaptioningArguments]:
    """`"openai:MODEL,base_url=URL,api_key_env=none"` -> `("openai:MODEL", args with those settings)`.

    A spec is `BACKEND:MODEL` optionally followed by `,key=value` pairs for the keys of `SPEC_OPTIONS`, which override
    the flag of the same name for this captioner only. A comma starts a new pair only before `key=`, so a JSON
    `extra_body={"a": 1, "b": 2}` keeps its commas.

    Raises:
        `ValueError`: for an unknown key, a pair without `=` or a value of the wrong type.
    """
    spec, *pairs = re.split(r",(?=\s*\w+\s*=)", value)
    if "," in spec:
        raise ValueError(f"--captioner {value!r}: after the spec, give settings as ,key=value (e.g. ,base_url=URL).")
    overrides = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        key = key.strip()
        if key not in SPEC_OPTIONS:
            raise ValueError(
                f"--captioner {value!r}: unknown setting {key!r}; a captioner's own settings are "
                f"{', '.join(SPEC_OPTIONS)}."
            )
        kind = SPEC_OPTIONS[key]
        try:
            overrides[key] = kind(text.strip())
        except ValueError:
            raise ValueError(f"--captioner {value!r}: {key} must be {kind.__name__}, got {text!r}.") from None
    return spec.strip(), replace(args, **overrides)


def captioner_kwargs(args: CaptioningArguments, spec: str) -> dict:
    """The backend keyword arguments for `make_captioner(spec, ...)`."""
    backend = spec.partition(":")[0]
    if backend in ("openai", "openai-batch"):
        kwargs = dict(
            base_url=args.base_url,
            api_key_env=None if args.api_key_env.strip().lower() in ("", "none") else args.api_key_env,
            max_concurrency=args.max_concurrency,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            **api_options(args),
        )
        if backend == "openai-batch":
            kwargs.update(
                completion_window=args.completion_window,
                poll_interval_s=args.poll_interval_s,
                max_requests_per_batch=args.max_requests_per_batch,
                retry_failed=args.batch_retry,
            )
        return kwargs
    if api_options(args):
        given = ", ".join(f"--{name}" for name in api_options(args))
        raise ValueError(f"{given} apply to API captioners (--captioner openai:MODEL) only, not to {spec!r}.")
    return dict(batch_size=args.batch_size, temperature=args.temperature, max_new_tokens=args.max_tokens)


def main(argv: list[str] | None = None) -> dict:
    (args,) = command_parser((CaptioningArguments,), __doc__).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_http_loggers()
    names = flag_names((CaptioningArguments,))
    try:
        with errors_in_flags(names):
            return caption_splits(args)
    except KeyboardInterrupt as error:  # one line, no traceback: what is kept and how to go on
        message = str(error) if isinstance(error, CaptioningInterrupted) else "Interrupted."
        print(f"\n{message}", file=sys.stderr)
        raise SystemExit(130) from None
    except (CaptionerUnavailableError, CaptioningError, CaptionCacheError, OpenBatchError) as error:  # says it all
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())  # one line
        raise SystemExit(f"mmft-hf caption: error: {message}") from None


def make_captioners(args: CaptioningArguments) -> list:
    """The captioner of each `--captioner` (the default one when none is given), each with its own settings; checks
    that every API key variable named is set before anything is built."""
    specs = [parse_captioner_spec(value, args) for value in args.captioner or [DEFAULT_CAPTIONER]]
    captioners = []
    for spec, own in specs:
        kwargs = captioner_kwargs(own, spec)
        key_variable = kwargs.get("api_key_env")
        if key_variable and not os.environ.get(key_variable, "").strip():
            raise ValueError(
                f"--api_key_env {key_variable}: the environment variable {key_variable} is not set. Set it (export "
                f"{key_variable}=...), name the variable holding your key with --api_key_env (or ,api_key_env= in "
                "the --captioner spec), or pass --api_key_env none for a local server that needs no key."
            )
    for spec, own in specs:
        captioners.append(make_captioner(spec, **captioner_kwargs(own, spec)))
    return captioners


def caption_splits(args: CaptioningArguments) -> dict:
    """Runs the command with parsed arguments; returns the `CaptioningSummary` (or estimate, export) per split."""
    args.caption_types = parse_caption_types(args.caption_types)
    if args.preset and args.preset not in PRESETS:
        raise ValueError(f"Unknown preset {args.preset!r}; choose from {list(PRESETS)}.")
    preset = PRESETS[args.preset] if args.preset else None
    domain = args.domain or (preset.domain if preset else None)
    if not domain:
        raise ValueError("Give --domain (the prompt's domain word) or --preset.")
    cache_dir = args.cache_dir or default_cache_dir()
    if not (args.output_dir or args.push_to_hub or args.estimate_only or args.export_requests or args.num_shards > 1):
        raise ValueError(
            "no destination: give --output_dir DIR (the captioned dataset in the Hub layout) or --push_to_hub "
            f"--hub_repo_id ORG/NAME before anything is paid for. Every caption is also kept in the cache ({cache_dir}),"
            " so a later run with a destination pays only for captions not there yet."
        )
    if args.push_to_hub and not args.hub_repo_id:
        raise ValueError("--push_to_hub needs --hub_repo_id org/name.")
    source = load_source(args)
    splits = list(dict.fromkeys(args.split))
    written = list(preset.splits) if preset and not args.dataset_name else list(source)
    unknown = [split for split in splits if split not in source]
    if unknown:
        raise ValueError(f"--split {' '.join(unknown)}: no such split; the dataset has {', '.join(source)}.")
    for flag, column in (
        ("--image_column", args.image_column or (preset.image_column if preset else "image")),
        ("--label_column", args.label_column or (preset.label_column if preset else "label")),
    ):
        for split in splits:
            if column not in source[split].column_names:
                raise ValueError(
                    f"{flag} {column!r}: split {split!r} has no such column; its columns are "
                    f"{', '.join(source[split].column_names)}."
                )
    for split in splits:
        if "captions" in source[split].column_names:
            raise ValueError(
                f"Split {split!r} already has a 'captions' column: give the source dataset, without captions (or "
                "remove that column first)."
            )
    class_names = read_class_names(args.class_names) if args.class_names else None
    captioners = make_captioners(args)
    if args.export_requests and len(captioners) > 1:
        raise ValueError(
            "--export_requests writes one captioner's requests: run it once per --captioner (each with its own "
            "file); --import_results then reads every file, and a run with all the captioners writes the dataset."
        )
    captioner = captioners if len(captioners) > 1 else captioners[0]
    captioned, summaries = {}, {}
    for path in args.import_results or ():
        print(import_caption_results(path, cache_dir=args.cache_dir))
    for split in splits:
        settings = dict(
            domain=domain,
            caption_types=args.caption_types,
            captions_per_type=args.captions_per_type,
            image_column=args.image_column or (preset.image_column if preset else "image"),
            label_column=args.label_column or (preset.label_column if preset else "label"),
            class_names=class_names,
            prompt_template=args.prompt_template,
            words=args.words,
            cache_dir=args.cache_dir,
            one_request_per_image=args.one_request_per_image,
        )
        if args.estimate_only:  # one estimate per captioner: models differ in price and tokens
            estimates = [
                estimate_captioning_cost(
                    source[split],
                    item,
                    sample_rows=args.estimate_sample_rows,
                    seed=args.estimate_seed,
                    price_per_million_input_tokens=args.price_per_million_input_tokens,
                    price_per_million_output_tokens=args.price_per_million_output_tokens,
                    batch_discount=args.batch_discount,
                    strict=args.strict,
                    allow_missing=args.allow_missing,
                    max_passes=args.max_passes,
                    **settings,
                )
                for item in captioners
            ]
            summaries[split] = estimates if len(estimates) > 1 else estimates[0]
            for item, estimate in zip(captioners, estimates, strict=True):
                who = f" {caption_source(item.cache_identity())}" if len(captioners) > 1 else ""
                print(f"[{split}{who}] {estimate}")
            continue
        if args.export_requests:
            stem, extension = os.path.splitext(args.export_requests)
            path = args.export_requests if len(splits) == 1 else f"{stem}-{split}{extension or '.jsonl'}"
            summaries[split] = export_caption_requests(
                source[split], path, captioner, num_shards=args.num_shards, shard_index=args.shard_index, **settings
            )
            print(f"[{split}] {summaries[split]}")
            continue
        result = caption_dataset(
            source[split],
            captioner,
            num_shards=args.num_shards,
            shard_index=args.shard_index,
            strict=args.strict,
            allow_missing=args.allow_missing,
            max_passes=args.max_passes,
            **settings,
        )
        captioned[split], summaries[split] = result, result.caption_summary
        print(f"[{split}] {result.caption_summary}")
    if args.estimate_only or args.export_requests:
        return summaries
    dataset_dict = datasets.DatasetDict(captioned)
    if args.num_shards > 1:
        # a shard is an intermediate result: keep it with save_to_disk; rerun unsharded to publish (cache hits)
        if args.output_dir:
            path = os.path.join(args.output_dir, f"shard-{args.shard_index:05d}-of-{args.num_shards:05d}")
            dataset_dict.save_to_disk(path)
            print(f"Saved shard to {path}.")
        print(
            f"The shard's captions are in the cache ({cache_dir}); rerun without --num_shards, with --output_dir or "
            "--push_to_hub, to write the dataset: every cached caption is reused, not paid again."
        )
        return summaries
    # the splits not captioned are written too, with empty caption lists: evaluation reads only images and labels
    for split in written:
        if split in dataset_dict:
            continue
        if source[split].features == source[splits[0]].features:
            dataset_dict[split] = source[split]
        else:  # one dataset has one schema: say so rather than leave the split out silently
            logger.warning(
                "Split %r is not written: its features %s differ from those of %r (%s). Caption it too (--split "
                "%s) or write it separately.",
                split, dict(source[split].features), splits[0], dict(source[splits[0]].features), split,
            )  # fmt: skip
    source_name = args.dataset_name or (preset.source if preset else None)
    if args.output_dir:
        print(
            "Wrote",
            push_captioned(dataset_dict, os.path.abspath(args.output_dir), source=source_name, license=args.license),
        )
    if args.push_to_hub:
        print("Pushed", push_captioned(dataset_dict, args.hub_repo_id, source=source_name, license=args.license))
    print(
        f"Captions are cached in {cache_dir}: rerunning this command (e.g. with another --output_dir) writes the "
        "dataset again without paying for them."
    )
    return summaries


if __name__ == "__main__":
    main()
