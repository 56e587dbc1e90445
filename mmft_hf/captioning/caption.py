"""`caption_dataset`: a labelled image `Dataset` in, the same rows plus MLLM captions out.

The expensive part of MMFT is paying an MLLM for three captions per training image, so this module never pays
twice: every caption is committed to a persistent SQLite cache (`caption_cache.py`) the moment it arrives, keyed
by the image's encoded bytes, the full prompt, the captioner identity and the caption slot. A rerun makes zero
requests; a killed run resumes with only the missing captions; runs and shards sharing one cache at once never
pay twice for a caption: each claims a caption in the cache before requesting it, and waits for the captions
another live run has claimed (`CaptionCache.claim`).

Provenance (captioner identity, prompt template, domain, caption types, counts) travels with the result in two
places: `info.description` (kept by `save_to_disk`) and the `id` of the caption column's string feature, which
datasets writes into the Parquet schema and the README `dataset_info`, so it also survives `push_to_hub`,
`load_dataset` and `map`. Read it back with `caption_provenance(dataset)`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import datasets
from tqdm.auto import tqdm

from ..images import IMAGE_DECODE_ERRORS, load_image
from ..version import __version__
from .cache import CaptionCache, ClaimKeeper, caption_key, default_cache_dir, identity_json, new_claim_owner
from .captioners.base import CaptionerUnavailableError, CaptionRequest
from .prompts import (
    CAPTION_TYPES,
    DEFAULT_WORDS,
    PROMPT_TEMPLATE,
    build_prompt,
    normalize_class_name,
    validate_caption_types,
    validate_template,
)

logger = logging.getLogger(__name__)

PROVENANCE_FORMAT = "mmft-hf-captions/1"
_DESCRIPTION_MARKER = "mmft-hf caption provenance: "
IMAGE_KEY = "sha256 of the image bytes as encoded in the dataset"
CAPTION_ORDER = "type-major: all captions of caption_types[0], then caption_types[1], ..."
# Provenance entries that differ between parts of one job (shards, splits) without the captions differing.
_VOLATILE_KEYS = ("shard", "counts", "mmft_hf_version")
# A run claims each caption in the cache before requesting it; its leases last this long unless renewed (they are
# renewed every third of it while the run lives), and a run waiting for another's captions looks this often.
CLAIM_TTL_S = 60.0
CLAIM_POLL_S = 0.5


@dataclass
class CaptionFailure:
    """A caption that could not be made.

    Args:
        row (`int`): row index in the dataset passed to `caption_dataset` (before sharding).
        caption_type (`str`): the caption type (characteristic word).
        slot (`int`): which caption of that type (0 .. captions_per_type - 1).
        reason (`str`): the last error reported by the captioner.
    """

    row: int
    caption_type: str
    slot: int
    reason: str

    def __str__(self) -> str:
        return f"row {self.row}, caption type {self.caption_type!r} (slot {self.slot}): {self.reason}"


@dataclass
class CaptioningSummary:
    """What one `caption_dataset` call did; attached to its result as `result.caption_summary`.

    Args:
        num_rows (`int`): rows captioned (this shard's rows when sharding).
        captions_expected (`int`): `num_rows × len(caption_types) × captions_per_type`.
        captions_done (`int`): captions in the result.
        cache_hits (`int`): captions found in the cache before any request.
        from_other_runs (`int`): captions another run sharing the cache was requesting (it had claimed them), read
            from the cache once stored instead of being paid for twice.
        requests (`int`): requests handed to the captioner, over all passes.
        retries (`int`): extra attempts the backend reported (`CaptionResult.retries`).
        passes (`int`): passes over missing captions that made requests.
        failures (`list[CaptionFailure]`): captions still missing.
        rows_incomplete (`int`): rows with some, but not all, captions.
        rows_without_captions (`int`): rows with no caption at all (their list is empty).
        usage (`dict[str, int]`): summed token counts reported by the backend.
        elapsed_s (`float`): wall-clock seconds.
        cache_path (`str`): the SQLite cache file.
    """

    num_rows: int = 0
    captions_expected: int = 0
    captions_done: int = 0
    cache_hits: int = 0
    from_other_runs: int = 0
    requests: int = 0
    retries: int = 0
    passes: int = 0
    failures: list[CaptionFailure] = field(default_factory=list)
    rows_incomplete: int = 0
    rows_without_captions: int = 0
    usage: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    cache_path: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        text = (
            f"Captioned {self.num_rows} rows: {self.captions_done}/{self.captions_expected} captions "
            f"({self.cache_hits} from cache, "
            + (f"{self.from_other_runs} from another run, " if self.from_other_runs else "")
            + f"{self.requests} requests in {self.passes} pass(es), "
            f"{self.retries} backend retries, {len(self.failures)} failed) in {self.elapsed_s:.1f} s; "
            f"tokens {self.usage or {}}; cache {self.cache_path}."
        )
        if self.failures:
            text += (
                f" {self.rows_incomplete} row(s) kept with fewer captions and {self.rows_without_captions} with none "
                "(the trainer uses the class template for those). Run the same call again to request only the "
                "missing captions."
            )
        return text


class CaptioningError(RuntimeError):
    """Raised by `caption_dataset(..., strict=True)` when captions are missing; `.failures` lists them."""

    def __init__(self, failures: list[CaptionFailure], summary: CaptioningSummary):
        self.failures, self.summary = failures, summary
        shown = "\n".join(f"  - {failure}" for failure in failures[:50])
        more = f"\n  ... and {len(failures) - 50} more" if len(failures) > 50 else ""
        super().__init__(
            f"{len(failures)} caption(s) failed after all passes:\n{shown}{more}\nEvery finished caption is cached "
            f"in {summary.cache_path}; rerun to request only the missing ones, or pass strict=False to keep the rows "
            "with the captions they have."
        )


class CaptioningInterrupted(KeyboardInterrupt):
    """Ctrl-C during `caption_dataset`: a `KeyboardInterrupt` whose message says what is cached and how to resume."""


def _resume_note(texts: list[list[str | None]], cache_path: str) -> str:
    done = sum(text is not None for row in texts for text in row)
    expected = sum(len(row) for row in texts)
    if not expected:  # stopped while reading the cache, before any request
        return f"Nothing was requested; the caption cache is {cache_path}."
    return (
        f"{done} of {expected} captions are cached in {cache_path}; run the same command again to resume (only the "
        "missing captions are requested)."
    )


def shard_bounds(num_rows: int, num_shards: int, shard_index: int) -> tuple[int, int]:
    """`[start, stop)` of a contiguous shard, the same split as `Dataset.shard(..., contiguous=True)`."""
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive integer, got {num_shards!r}.")
    if not isinstance(shard_index, int) or not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index!r}.")
    size, extra = divmod(num_rows, num_shards)
    start = size * shard_index + min(shard_index, extra)
    return start, start + size + (shard_index < extra)


def resolve_class_names(dataset: datasets.Dataset, label_column: str, class_names=None) -> list[str] | None:
    """Raw class names per label id: `class_names`, else the `ClassLabel` names; `None` for string labels."""
    feature = dataset.features[label_column]
    if class_names is not None:
        if isinstance(class_names, str):
            raise ValueError(
                f"class_names is the string {class_names!r}; pass a list with one name per label id, e.g. "
                "['banded', 'dotted']."
            )
        names = [str(name) for name in class_names]
        if isinstance(feature, datasets.ClassLabel) and len(names) != feature.num_classes:
            raise ValueError(
                f"class_names has {len(names)} names but column {label_column!r} is a ClassLabel with "
                f"{feature.num_classes} classes {feature.names}; pass one name per label id, in label order, or "
                "leave class_names unset to use the ClassLabel's own names."
            )
        return names
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return None
    raise ValueError(
        f"Column {label_column!r} is {feature}, which carries no class names. Cast it to a ClassLabel "
        f"(dataset.class_encode_column({label_column!r}) or cast_column) or pass class_names=[...]."
    )


def _image_bytes(value: dict, row: int, image_column: str) -> bytes:
    if value is None:
        return b""
    if value.get("bytes") is not None:
        return value["bytes"]
    if value.get("path"):
        from datasets.utils.file_utils import xopen

        try:
            with xopen(value["path"], "rb") as handle:
                return handle.read()
        except OSError as error:
            raise ValueError(
                f"Row {row}, column {image_column!r}: cannot read image file {value['path']!r}: {error}"
            ) from None
    raise ValueError(f"Row {row}, column {image_column!r}: the image has neither bytes nor a path.")


def _undecoded(dataset: datasets.Dataset, image_column: str, label_column: str) -> datasets.Dataset:
    """The image and label columns, images as encoded bytes/paths (hashing needs no decoding)."""
    return dataset.select_columns([image_column, label_column]).cast_column(image_column, datasets.Image(decode=False))


def _image_hashes_and_prompts(
    raw: datasets.Dataset,
    start: int,
    names: list[str] | None,
    image_column: str,
    label_column: str,
    slots: list[tuple[str, int]],
    domain: str,
    words: int,
    prompt_template: str,
) -> tuple[list[str | None], list[list[str]]]:
    """Per row of `raw` (see `_undecoded`; `start` is its first row's number in messages): the SHA-256 of the
    encoded image (`None` for a missing image) and the prompt of every slot."""
    image_hashes, prompts, prompt_of = [], [], {}
    position = 0
    for batch in raw.iter(batch_size=256):
        for value, label in zip(batch[image_column], batch[label_column], strict=True):
            row = start + position
            data = _image_bytes(value, row, image_column)
            image_hashes.append(hashlib.sha256(data).hexdigest() if data else None)
            if label is None:
                raise ValueError(f"Row {row}: column {label_column!r} is empty; every image needs a label.")
            if label not in prompt_of:
                if names is None:
                    raw_name = str(label)
                elif isinstance(label, int) and 0 <= label < len(names):
                    raw_name = names[label]
                else:
                    raise ValueError(f"Row {row}: label {label!r} has no class name ({len(names)} names given).")
                class_name = normalize_class_name(raw_name)
                prompt_of[label] = [
                    build_prompt(class_name, domain, kind, words, prompt_template) for kind, _ in slots
                ]
            prompts.append(prompt_of[label])
            position += 1
    return image_hashes, prompts


def _caption_keys(
    image_hashes: list[str | None], prompts: list[list[str]], slots: list[tuple[str, int]], identity_text: str
) -> list[list[str | None]]:
    return [
        [caption_key(digest, prompts[row][s], identity_text, slots[s][1]) for s in range(len(slots))]
        if digest
        else [None] * len(slots)
        for row, digest in enumerate(image_hashes)
    ]


def caption_keys(
    dataset: datasets.Dataset,
    captioner,
    *,
    domain: str,
    caption_types: Sequence[str] = CAPTION_TYPES,
    captions_per_type: int = 1,
    image_column: str = "image",
    label_column: str = "label",
    class_names: Sequence[str] | None = None,
    prompt_template: str = PROMPT_TEMPLATE,
    words: int = DEFAULT_WORDS,
) -> list[list[str | None]]:
    """The cache key of every caption `caption_dataset` would make with these settings, per row (type-major);
    `None` for a row without an image. Computed exactly as `caption_dataset` computes them."""
    types = validate_caption_types(caption_types)
    names = resolve_class_names(dataset, label_column, class_names)
    slots = [(kind, copy) for kind in types for copy in range(captions_per_type)]
    image_hashes, prompts = _image_hashes_and_prompts(
        _undecoded(dataset, image_column, label_column), 0, names, image_column, label_column, slots, domain, words,
        prompt_template,
    )  # fmt: skip
    return _caption_keys(image_hashes, prompts, slots, identity_json(captioner.cache_identity()))


def _provenance_settings(
    *,
    prompt_template: str,
    domain: str,
    caption_types: Sequence[str],
    captions_per_type: int,
    words: int,
    class_names: Sequence[str] | None,
    image_column: str,
    label_column: str,
) -> dict:
    """The caption settings recorded in the provenance: everything that shapes the captions but the captioner.

    Args:
        prompt_template, domain, caption_types, captions_per_type, words, class_names, image_column, label_column:
            as given to `caption_dataset`.

    Returns:
        `dict`: JSON-ready settings, including the caption order.
    """
    return {
        "prompt_template": prompt_template,
        "domain": domain,
        "caption_types": list(caption_types),
        "captions_per_type": captions_per_type,
        "caption_order": CAPTION_ORDER,
        "words": words,
        "class_names": list(class_names) if class_names is not None else None,
        "image_column": image_column,
        "label_column": label_column,
    }


def _differing_settings(reference: dict, other: dict, ignore: Sequence[str] = _VOLATILE_KEYS) -> list[str]:
    """The provenance keys whose values differ between `reference` and `other`, sorted, skipping `ignore`."""
    return sorted(k for k in set(reference) | set(other) if k not in ignore and reference.get(k) != other.get(k))


def _provenance(captioner_identity, settings: dict, shard, counts: dict) -> dict:
    return {
        "format": PROVENANCE_FORMAT,
        "mmft_hf_version": __version__,
        "captioner": captioner_identity,
        **settings,
        "image_key": IMAGE_KEY,
        "shard": shard,
        "counts": counts,
    }


def attach_provenance(dataset: datasets.Dataset, provenance: dict, caption_column: str = "captions"):
    """Returns `dataset` with `provenance` stored in its caption feature's `id` and in `info.description`."""
    text = json.dumps(provenance, sort_keys=True, ensure_ascii=False)
    feature = datasets.List(datasets.Value("string", id=text))
    if dataset.features[caption_column] != feature:
        dataset = dataset.cast_column(caption_column, feature)
    dataset.info.description = (
        f"Images with synthetic captions made by mmft-hf for MMFT fine-tuning.\n{_DESCRIPTION_MARKER}{text}"
    )
    return dataset


def caption_provenance(dataset: datasets.Dataset, caption_column: str = "captions") -> dict | None:
    """Reads the provenance written by `caption_dataset`, or `None` when there is none.

    Args:
        dataset (`datasets.Dataset`): a captioned dataset, e.g. from `load_dataset` or `load_from_disk`.
        caption_column (`str`, defaults to `"captions"`): the caption column.
    """
    feature = dataset.features.get(caption_column)
    inner = getattr(feature, "feature", None)
    for text in (getattr(inner, "id", None), dataset.info.description or ""):
        if text and _DESCRIPTION_MARKER in text:
            text = text.split(_DESCRIPTION_MARKER, 1)[1]
        try:
            value = json.loads(text) if text else None
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and value.get("format") == PROVENANCE_FORMAT:
            return value
    return None


def caption_dataset(
    dataset: datasets.Dataset,
    captioner,
    *,
    domain: str,
    caption_types: Sequence[str] = CAPTION_TYPES,
    captions_per_type: int = 1,
    image_column: str = "image",
    label_column: str = "label",
    caption_column: str = "captions",
    class_names: Sequence[str] | None = None,
    prompt_template: str = PROMPT_TEMPLATE,
    words: int = DEFAULT_WORDS,
    cache_dir: str | None = None,
    num_shards: int = 1,
    shard_index: int = 0,
    strict: bool = False,
    max_passes: int = 3,
    retry_resize: tuple[int, int] | None = (224, 512),
    chunk_size: int = 256,
    seed: int = 0,
    show_progress: bool = True,
    one_request_per_image: bool = False,
) -> datasets.Dataset:
    """Captions every image of a labelled dataset with an MLLM, `len(caption_types) × captions_per_type` each.

    Args:
        dataset (`datasets.Dataset`): one split with an `Image` column and a label column.
        captioner (`Captioner`): a backend implementing `mmft_hf.captioning.captioners.base.Captioner`.
        domain (`str`): the domain word of the prompt, e.g. `"textures"` (see `mmft_hf.captioning.prompts.DOMAINS`).
        caption_types (`Sequence[str]`, defaults to `("visual", "shape", "texture")`): characteristic words.
        captions_per_type (`int`, defaults to 1): distinct captions per image and type.
        image_column (`str`, defaults to `"image"`): the `Image` column.
        label_column (`str`, defaults to `"label"`): a `ClassLabel` column, or string labels.
        caption_column (`str`, defaults to `"captions"`): the column to add; it must not exist yet.
        class_names (`Sequence[str]`, *optional*): names per label id, overriding the `ClassLabel` names. Names
            are normalised for the prompt (`normalize_class_name`).
        prompt_template (`str`, defaults to `PROMPT_TEMPLATE`): a custom template containing `{class_name}`.
        words (`int`, defaults to 50): requested caption length in words.
        cache_dir (`str`, *optional*): caption cache directory (or `.sqlite` file); defaults to
            `$MMFT_HF_CACHE` or `$HF_HOME/mmft_hf`. Shards may share it.
        num_shards (`int`, defaults to 1): split the work into this many contiguous shards...
        shard_index (`int`, defaults to 0): ...and caption only this one. Merge the results with
            `merge_caption_shards`, or simply rerun with `num_shards=1` afterwards: every caption is then a
            cache hit.
        strict (`bool`, defaults to `False`): raise `CaptioningError` listing every missing caption instead of
            keeping rows with fewer captions.
        max_passes (`int`, defaults to 3): passes over still-missing captions. Backends already retry transient
            errors per request, so later passes catch item-specific failures.
        retry_resize (`tuple[int, int]`, *optional*, defaults to `(224, 512)`): from the second pass on, send the
            image resized to a random square side in this range (the reference's retry); `None` keeps it as is.
        chunk_size (`int`, defaults to 256): requests handed to the captioner at once (bounds decoded images in
            memory).
        seed (`int`, defaults to 0): seeds the retry resizing.
        show_progress (`bool`, defaults to `True`): show a tqdm bar.
        one_request_per_image (`bool`, defaults to `False`): ask for every caption type of an image in one request
            (a JSON reply; the image's tokens are paid once instead of once per type). Each caption is cached under
            its per-type key, its origin (the joint prompt) recorded; types a reply lacks are then requested per
            type in the usual passes. Off by default: the paper's protocol asks per type. See
            `mmft_hf.captioning.joint`.

    Returns:
        `datasets.Dataset`: the input rows (this shard's rows when sharding), all columns kept, plus
        `caption_column` (`List(string)`), ordered type-major: the `captions_per_type` captions of the first type,
        then of the second, and so on. A row missing some captions keeps the ones it has (fewer entries); a row
        with none gets an empty list and is never dropped. `caption_provenance(result)` gives the provenance and
        `result.caption_summary` the `CaptioningSummary` of this call.

    Raises:
        [`~captioners.base.CaptionerUnavailableError`]: the backend cannot answer (unreachable server, rejected key,
            unknown model, or a server that stopped answering mid-run); the message adds how many captions are
            cached and that the same call resumes.
        [`CaptioningInterrupted`]: on Ctrl-C (a `KeyboardInterrupt`), with the same one-line message.
        [`CaptioningError`]: with `strict=True`, when captions are still missing after all passes.
        `ValueError`: invalid arguments or data (before anything is requested).
    """
    started = time.monotonic()
    if isinstance(dataset, datasets.DatasetDict):
        raise TypeError("caption_dataset takes one split: pass dataset['train'] (or use CaptionedImages).")
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}.")
    for name, role in ((image_column, "image_column"), (label_column, "label_column")):
        if name not in dataset.column_names:
            raise ValueError(f"Column {name!r} ({role}) not found; the dataset has {dataset.column_names}.")
    if caption_column in dataset.column_names:
        raise ValueError(
            f"The dataset already has a {caption_column!r} column. Remove it "
            f"(dataset.remove_columns({caption_column!r})) or pass another caption_column."
        )
    image_feature = dataset.features[image_column]
    if not isinstance(image_feature, datasets.Image):
        raise ValueError(f"Column {image_column!r} must be a datasets.Image feature, got {image_feature}.")
    if not all(hasattr(captioner, attr) for attr in ("caption", "cache_identity")):
        raise TypeError("captioner must implement caption(requests) and cache_identity() (see captioners/base.py).")
    types = validate_caption_types(caption_types)
    validate_template(prompt_template)
    if not isinstance(captions_per_type, int) or captions_per_type < 1:
        raise ValueError(f"captions_per_type must be a positive integer, got {captions_per_type!r}.")
    if not isinstance(max_passes, int) or max_passes < 1:
        raise ValueError(f"max_passes must be a positive integer, got {max_passes!r}.")
    names = resolve_class_names(dataset, label_column, class_names)
    build_prompt("x", domain, types[0], words, prompt_template)  # validates domain and words early

    start, stop = shard_bounds(len(dataset), num_shards, shard_index)
    part = dataset.shard(num_shards, shard_index, contiguous=True) if num_shards > 1 else dataset
    assert len(part) == stop - start
    identity = captioner.cache_identity()
    identity_text = identity_json(identity)
    slots = [(kind, copy) for kind in types for copy in range(captions_per_type)]

    # Hash the encoded bytes, not decoded pixels: no decoding on a rerun, and stable across Pillow/libjpeg
    # versions. Parquet (push_to_hub) keeps the exact file bytes, so a reloaded dataset hits the same cache.
    raw = _undecoded(part, image_column, label_column)
    image_hashes, prompts = _image_hashes_and_prompts(
        raw, start, names, image_column, label_column, slots, domain, words, prompt_template
    )

    summary = CaptioningSummary(num_rows=len(part), captions_expected=len(part) * len(slots))
    cache = CaptionCache(cache_dir if cache_dir is not None else default_cache_dir())
    summary.cache_path = cache.path
    # Two runs sharing the cache never pay twice: each claims a caption before requesting it (see cache.py).
    claim_owner = new_claim_owner()
    claim_keeper = ClaimKeeper(cache.path, claim_owner, CLAIM_TTL_S)
    texts: list[list[str | None]] = []
    try:
        keys = _caption_keys(image_hashes, prompts, slots, identity_text)
        cached = cache.get_many(key for row_keys in keys for key in row_keys if key)
        texts = [[cached.get(key) if key else None for key in row_keys] for row_keys in keys]
        summary.cache_hits = sum(text is not None for row in texts for text in row)
        reasons = {}
        for row, digest in enumerate(image_hashes):
            if digest is None:  # a null image: nothing to send, reported as a failure
                reasons.update({(row, s): "the image is missing (None)" for s in range(len(slots))})
        sync_passes = max_passes
        if one_request_per_image or getattr(captioner, "submits_batches", False):
            from .scale import PassState, row_image_loader, run_scale_passes  # joint requests, batch engines

            state = PassState(
                keys, prompts, image_hashes, slots, identity_text, texts, reasons, summary, chunk_size=chunk_size,
                load_image=row_image_loader(raw, image_column, image_feature.mode, retry_resize, seed),
                unreadable_errors=IMAGE_DECODE_ERRORS, claim_owner=claim_owner, claim_ttl_s=CLAIM_TTL_S,
            )  # fmt: skip
            sync_passes -= run_scale_passes(
                captioner, state, cache, one_request_per_image=one_request_per_image, max_passes=max_passes,
                show_progress=show_progress,
            )  # fmt: skip
        pending = [
            (row, s)
            for row in range(len(part))
            for s in range(len(slots))
            if texts[row][s] is None and image_hashes[row]
        ]
        missing_per_row = [sum(text is None for text in row) for row in texts]
        complete_rows = missing_per_row.count(0)
        unreadable: dict[int, str] = {}  # rows whose image cannot be decoded: reported, never sent, not retried
        rng = random.Random(seed)

        def claim(items: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
            """Splits `items` into those to request now (claimed here) and those another run (or an earlier item
            with the same key) is making; captions stored meanwhile are read from the cache."""
            nonlocal complete_rows
            granted = cache.claim({keys[row][s] for row, s in items}, claim_owner, CLAIM_TTL_S)
            mine, others = [], []
            for row, s in items:
                key = keys[row][s]
                (mine if key in granted else others).append((row, s))
                granted.discard(key)  # an equal key later in `items` waits for this one
            stored = cache.get_many(keys[row][s] for row, s in others)
            waiting = []
            for row, s in others:
                if keys[row][s] not in stored:
                    waiting.append((row, s))
                    continue
                texts[row][s] = stored[keys[row][s]]
                reasons.pop((row, s), None)
                missing_per_row[row] -= 1
                complete_rows += missing_per_row[row] == 0
                summary.from_other_runs += 1
                bar.update(1)
            return mine, waiting

        with tqdm(total=len(pending), unit="req", desc="Captioning", disable=not show_progress or not pending) as bar:
            for pass_index in range(sync_passes):
                if not pending:
                    break
                summary.passes += 1
                failed_this_pass = 0
                if pass_index:
                    bar.total += len(pending)
                    bar.refresh()
                queue, waiting = list(pending), []  # waiting: captions claimed by another run
                while queue or waiting:
                    if not queue:  # only captions others are making are left: look again in a moment
                        bar.set_postfix(waiting_for_another_run=len(waiting))
                        time.sleep(CLAIM_POLL_S)
                        queue, waiting = waiting, []
                    chunk, queue = queue[:chunk_size], queue[chunk_size:]
                    chunk, claimed_elsewhere = claim(chunk)
                    waiting += claimed_elsewhere
                    images = {}
                    for row, _ in chunk:
                        if row in images or row in unreadable:
                            continue
                        try:
                            image = load_image(raw[row][image_column])
                            if image_feature.mode and image.mode != image_feature.mode:
                                image = image.convert(image_feature.mode)
                        except IMAGE_DECODE_ERRORS as error:
                            unreadable[row] = f"the image cannot be read ({type(error).__name__}: {error})"
                            continue
                        if pass_index and retry_resize:
                            side = rng.randrange(*retry_resize)
                            image = image.resize((side, side))
                        images[row] = image
                    for row, s in chunk:
                        if row in unreadable:
                            reasons[(row, s)] = unreadable[row]
                    chunk = [(row, s) for row, s in chunk if row not in unreadable]
                    requests = [CaptionRequest(image=images[row], prompt=prompts[row][s]) for row, s in chunk]
                    answered = set()
                    # No try/except: an authentication error (or any exception) from the backend propagates at
                    # once; every caption received so far is already committed.
                    for index, result in captioner.caption(requests):
                        if not 0 <= index < len(chunk) or index in answered:
                            raise RuntimeError(f"The captioner yielded an invalid or repeated index {index!r}.")
                        answered.add(index)
                        row, s = chunk[index]
                        summary.requests += 1
                        summary.retries += int(result.retries or 0)
                        for name, value in (result.usage or {}).items():
                            if isinstance(value, (int, float)):
                                summary.usage[name] = summary.usage.get(name, 0) + value
                        text = (result.text or "").strip()
                        if text:
                            cache.put(
                                keys[row][s],
                                text,
                                image_sha256=image_hashes[row],
                                prompt=prompts[row][s],
                                identity=identity_text,
                                slot=slots[s][1],
                                usage=result.usage,
                            )
                            texts[row][s] = text
                            reasons.pop((row, s), None)
                            missing_per_row[row] -= 1
                            complete_rows += missing_per_row[row] == 0
                        else:
                            reasons[(row, s)] = result.error or "the captioner returned an empty caption"
                            failed_this_pass += 1
                            cache.release(claim_owner, [keys[row][s]])  # free for another run to try
                        bar.update(1)
                        bar.set_postfix(images=f"{complete_rows}/{len(part)}", failed=failed_this_pass, refresh=False)
                    for index in set(range(len(chunk))) - answered:
                        reasons[chunk[index]] = "the captioner returned no result for this request"
                pending = [(row, s) for row, s in pending if texts[row][s] is None and row not in unreadable]
    except CaptionerUnavailableError as error:  # the backend cannot answer at all: stop, saying how to resume
        raise type(error)(f"{error}\n{_resume_note(texts, cache.path)}") from None
    except KeyboardInterrupt:
        raise CaptioningInterrupted(f"Interrupted. {_resume_note(texts, cache.path)}") from None
    finally:
        claim_keeper.close()
        cache.close()

    summary.failures = [
        CaptionFailure(row=start + row, caption_type=slots[s][0], slot=slots[s][1], reason=reasons.get((row, s), "?"))
        for row in range(len(part))
        for s in range(len(slots))
        if texts[row][s] is None
    ]
    columns = [[text for text in row if text is not None] for row in texts]
    summary.captions_done = sum(len(row) for row in columns)
    summary.rows_without_captions = sum(not row for row in columns)
    summary.rows_incomplete = sum(0 < len(row) < len(slots) for row in columns)
    summary.elapsed_s = time.monotonic() - started
    if summary.failures:
        logger.warning("%d caption(s) missing:\n%s", len(summary.failures), "\n".join(map(str, summary.failures[:20])))
    logger.debug("%s", summary)  # callers print it (the CLI does), or read result.caption_summary
    if strict and summary.failures:
        raise CaptioningError(summary.failures, summary)

    settings = _provenance_settings(
        prompt_template=prompt_template,
        domain=domain,
        caption_types=types,
        captions_per_type=captions_per_type,
        words=words,
        class_names=class_names,
        image_column=image_column,
        label_column=label_column,
    )
    shard = {"num_shards": num_shards, "shard_index": shard_index, "start": start, "stop": stop}
    result = part.add_column(caption_column, columns, feature=datasets.List(datasets.Value("string")))
    result = attach_provenance(
        result, _provenance(identity, settings, shard if num_shards > 1 else None, _counts(columns, len(slots)))
    )
    result.caption_summary = summary
    return result


def _counts(columns: list[list[str]], per_row: int) -> dict:
    return {
        "rows": len(columns),
        "captions": sum(len(row) for row in columns),
        "captions_expected": len(columns) * per_row,
        "rows_incomplete": sum(0 < len(row) < per_row for row in columns),
        "rows_without_captions": sum(not row for row in columns),
    }


def merge_caption_shards(shards: Sequence[datasets.Dataset], caption_column: str = "captions") -> datasets.Dataset:
    """Concatenates the shards made by `caption_dataset(..., num_shards=n, shard_index=i)` in shard order.

    The shards must come from one job: same settings and captioner, every index `0 .. n-1` exactly once (given
    in any order). The simplest alternative is to rerun `caption_dataset` with `num_shards=1` once all shards
    have finished: every caption is then a cache hit and no request is made.

    Args:
        shards (`Sequence[datasets.Dataset]`): the shard results.
        caption_column (`str`, defaults to `"captions"`): the caption column.

    Returns:
        `datasets.Dataset`: all rows in their original order, with merged provenance.
    """
    if not shards:
        raise ValueError("merge_caption_shards needs at least one shard.")
    provenances = []
    for position, shard in enumerate(shards):
        provenance = caption_provenance(shard, caption_column)
        if provenance is None or not provenance.get("shard"):
            raise ValueError(
                f"Shard {position} has no shard provenance; pass results of caption_dataset(..., num_shards=n, "
                "shard_index=i) with n > 1."
            )
        provenances.append(provenance)
    reference = provenances[0]
    for position, provenance in enumerate(provenances[1:], start=1):
        differing = _differing_settings(reference, provenance)
        if differing:
            raise ValueError(f"Shard {position} was made with different settings ({differing}) than shard 0.")
    num_shards = provenances[0]["shard"]["num_shards"]
    indices = sorted(p["shard"]["shard_index"] for p in provenances)
    if indices != list(range(num_shards)) or any(p["shard"]["num_shards"] != num_shards for p in provenances):
        raise ValueError(f"Expected shard indices 0..{num_shards - 1} once each, got {indices}.")
    order = sorted(range(len(shards)), key=lambda i: provenances[i]["shard"]["shard_index"])
    plain = datasets.List(datasets.Value("string"))
    merged = datasets.concatenate_datasets([shards[i].cast_column(caption_column, plain) for i in order])
    per_row = len(reference["caption_types"]) * reference["captions_per_type"]
    provenance = {**provenances[order[0]], "shard": None}
    provenance["counts"] = _counts([list(row) for row in merged[caption_column]], per_row)
    return attach_provenance(merged, provenance, caption_column)
