"""`caption_dataset`: a labelled image `Dataset` in, the same rows plus MLLM captions out.

The expensive part of MMFT is paying an MLLM for three captions per training image, so nothing here pays twice:
every caption is committed to a persistent SQLite cache (`cache.py`) the moment it arrives, keyed by the image's
encoded bytes, the full prompt, the captioner identity and the caption slot. A rerun makes zero requests; a killed
run resumes with only the missing captions; runs and shards sharing one cache at once never pay twice. The passes,
claims, batches and the quality gate are the pass engine's (`engine.py`); this module turns a dataset into the
engine's rows and its captions back into a column with provenance (`provenance.py`).
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Sequence

import datasets

from ..images import load_image
from .cache import CaptionCache, ClaimKeeper, caption_key, default_cache_dir, identity_json, new_claim_owner
from .captioners.base import Captioner, CaptionerUnavailableError
from .captioners.openai_batch import as_batch_captioner
from .engine import (
    CLAIM_TTL_S,
    CaptionEngine,
    CaptioningError,
    CaptioningInterrupted,
    CaptioningSummary,
    CaptionRows,
    log_failures,
)
from .ledger import SubmissionLedger
from .prompts import (
    CAPTION_TYPES,
    DEFAULT_WORDS,
    PROMPT_TEMPLATE,
    build_prompt,
    normalize_class_name,
    validate_caption_types,
    validate_template,
)
from .provenance import (
    SOURCES_COLUMN,
    CaptionSettings,
    attach_provenance,
    caption_counts,
    caption_provenance,
    caption_source,
    captions_per_row,
    differing_settings,
    make_provenance,
)

logger = logging.getLogger(__name__)


def _resume_note(engines: list[CaptionEngine], expected: int, cache: CaptionCache) -> str:
    """How many of the `expected` captions are cached and how to resume; one sentence, no line break."""
    if not engines:  # stopped while reading the cache, before any request
        return f"Nothing was requested; the caption cache is {cache.path}."
    done = 0
    for engine in engines:  # read back: a caption committed just before the stop counts too
        stored = cache.get_many(engine.positions)
        done += sum(len(positions) for key, positions in engine.positions.items() if key in stored)
    return (
        f"{done} of {expected} captions are cached in {cache.path}; run the same command again to resume (only the "
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


def caption_settings(
    *,
    domain: str,
    caption_types: Sequence[str] = CAPTION_TYPES,
    captions_per_type: int = 1,
    image_column: str = "image",
    label_column: str = "label",
    class_names: Sequence[str] | None = None,
    prompt_template: str = PROMPT_TEMPLATE,
    words: int = DEFAULT_WORDS,
) -> CaptionSettings:
    """The `CaptionSettings` of `caption_dataset`'s arguments (the same for its export and its cost estimate): the
    caption types checked, `class_names` as a tuple (a string is kept as given, for `resolve_class_names` to refuse)."""
    return CaptionSettings(
        domain=domain,
        caption_types=tuple(validate_caption_types(caption_types)),
        captions_per_type=captions_per_type,
        words=words,
        prompt_template=prompt_template,
        class_names=tuple(class_names)
        if class_names is not None and not isinstance(class_names, str)
        else class_names,
        image_column=image_column,
        label_column=label_column,
    )


def caption_keys(dataset: datasets.Dataset, captioner, **settings) -> list[list[str | None]]:
    """The cache key of every caption `caption_dataset` would make with these settings (`domain=`, `caption_types=`,
    ... as for `caption_settings`), per row (type-major); `None` for a row without an image. Computed exactly as
    `caption_dataset` computes them."""
    settings = caption_settings(**settings)
    names = resolve_class_names(dataset, settings.label_column, settings.class_names)
    return caption_rows(dataset, captioner, settings, names).keys


def as_captioners(captioner) -> list:
    """`captioner` as a list: a list or tuple of captioners as given, a single captioner as a list of one."""
    captioners = list(captioner) if isinstance(captioner, (list, tuple)) else [captioner]
    if not captioners:
        raise ValueError("captioner is an empty list; pass a captioner or a list of captioners.")
    return captioners


def check_settings(dataset: datasets.Dataset, captioner, settings: CaptionSettings) -> list[str] | None:
    """Validates the dataset's columns, the captioner(s) and the caption settings before anything is requested;
    returns the raw class names per label id (`None` for string labels)."""
    if isinstance(dataset, datasets.DatasetDict):
        raise TypeError("caption_dataset takes one split: pass dataset['train'] (or use CaptionedImages).")
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}.")
    for name, role in ((settings.image_column, "image_column"), (settings.label_column, "label_column")):
        if name not in dataset.column_names:
            raise ValueError(f"Column {name!r} ({role}) not found; the dataset has {dataset.column_names}.")
    image_feature = dataset.features[settings.image_column]
    if not isinstance(image_feature, datasets.Image):
        raise ValueError(f"Column {settings.image_column!r} must be a datasets.Image feature, got {image_feature}.")
    captioners, seen = as_captioners(captioner), {}
    for position, item in enumerate(captioners):
        if not isinstance(item, Captioner):
            hint = (
                f": build it with mmft_hf.captioning.builder.make_captioner({item!r})" if isinstance(item, str) else ""
            )
            raise TypeError(
                f"captioner {position} is a {type(item).__name__}, not a Captioner (caption(requests) and "
                f"cache_identity(), see captioners/base.py){hint}."
            )
        identity = identity_json(item.cache_identity())
        if identity in seen:
            raise ValueError(
                f"captioners {seen[identity]} and {position} have the same identity {identity}: they would write the "
                "same captions; pass each captioner once (another model, temperature or cache_tag makes another)."
            )
        seen[identity] = position
    validate_caption_types(settings.caption_types)
    validate_template(settings.prompt_template)
    if not isinstance(settings.captions_per_type, int) or settings.captions_per_type < 1:
        raise ValueError(f"captions_per_type must be a positive integer, got {settings.captions_per_type!r}.")
    names = resolve_class_names(dataset, settings.label_column, settings.class_names)
    build_prompt("x", settings.domain, settings.caption_types[0], settings.words, settings.prompt_template)
    return names


def caption_rows(
    part: datasets.Dataset,
    captioner,
    settings: CaptionSettings,
    names: list[str] | None,
    *,
    first_row: int = 0,
    retry_resize: tuple[int, int] | None = (224, 512),
    seed: int = 0,
) -> CaptionRows:
    """The engine's view of `part` for one captioner: image hashes, per-slot prompts and cache keys, an image loader.

    Hashing reads the encoded bytes, not decoded pixels: no decoding on a rerun, and stable across Pillow/libjpeg
    versions. Parquet (push_to_hub) keeps the exact file bytes, so a reloaded dataset hits the same cache.
    """
    return caption_rows_per_captioner(
        part, [captioner], settings, names, first_row=first_row, retry_resize=retry_resize, seed=seed
    )[0]


def caption_rows_per_captioner(
    part: datasets.Dataset,
    captioners: Sequence,
    settings: CaptionSettings,
    names: list[str] | None,
    *,
    first_row: int = 0,
    retry_resize: tuple[int, int] | None = (224, 512),
    seed: int = 0,
) -> list[CaptionRows]:
    """`caption_rows` of each captioner, hashing the images once: the rows differ only in their identity and keys."""
    slots = settings.slots
    raw = _undecoded(part, settings.image_column, settings.label_column)
    image_hashes, prompts = _image_hashes_and_prompts(
        raw, first_row, names, settings.image_column, settings.label_column, slots, settings.domain, settings.words,
        settings.prompt_template,
    )  # fmt: skip
    mode, rng = part.features[settings.image_column].mode, random.Random(seed)

    def load(row: int, retry: bool):
        image = load_image(raw[row][settings.image_column])
        if mode and image.mode != mode:
            image = image.convert(mode)
        if retry and retry_resize:  # the reference's retry: a random square side in `retry_resize`
            side = rng.randrange(*retry_resize)
            image = image.resize((side, side))
        return image

    result = []
    for captioner in captioners:
        identity = identity_json(captioner.cache_identity())
        keys = _caption_keys(image_hashes, prompts, slots, identity)
        result.append(
            CaptionRows(keys, prompts, image_hashes, slots, identity, load, first_row, settings.image_column)
        )
    return result


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
    sources_column: str = SOURCES_COLUMN,
    class_names: Sequence[str] | None = None,
    prompt_template: str = PROMPT_TEMPLATE,
    words: int = DEFAULT_WORDS,
    cache_dir: str | None = None,
    num_shards: int = 1,
    shard_index: int = 0,
    strict: bool = False,
    allow_missing: bool = False,
    max_passes: int = 3,
    retry_resize: tuple[int, int] | None = (224, 512),
    chunk_size: int = 256,
    seed: int = 0,
    show_progress: bool = True,
    one_request_per_image: bool = False,
) -> datasets.Dataset:
    """Captions every image of a labelled dataset with one MLLM or several, `len(caption_types) × captions_per_type`
    captions each per captioner.

    Args:
        dataset (`datasets.Dataset`): one split with an `Image` column and a label column.
        captioner (`Captioner`, `BatchCaptioner`, or a list of them): a backend of
            `mmft_hf.captioning.captioners.base`; a `BatchCaptioner` (`OpenAIBatchCaptioner`) gets the requests as
            Batch API batches. Several captioners each caption every image with every caption type, one after the
            other through the same engine; cache keys stay per captioner, so adding a captioner to a captioned dataset
            pays only for the new one's captions. Each must have its own `cache_identity()`.
        domain (`str`): the domain word of the prompt, e.g. `"textures"` (see `mmft_hf.captioning.prompts.DOMAINS`).
        caption_types (`Sequence[str]`, defaults to `("visual", "shape", "texture")`): characteristic words.
        captions_per_type (`int`, defaults to 1): distinct captions per image and type.
        image_column (`str`, defaults to `"image"`): the `Image` column.
        label_column (`str`, defaults to `"label"`): a `ClassLabel` column, or string labels.
        caption_column (`str`, defaults to `"captions"`): the column to add; it must not exist yet.
        sources_column (`str`, defaults to `"caption_sources"`): with several captioners, the column added beside
            `caption_column` naming the captioner of each caption (`caption_source`: model and identity hash). A
            single captioner adds no such column (its dataset reads exactly as before).
        class_names (`Sequence[str]`, *optional*): names per label id, overriding the `ClassLabel` names. Names
            are normalised for the prompt (`normalize_class_name`).
        prompt_template (`str`, defaults to `PROMPT_TEMPLATE`): a custom template containing `{class_name}`.
        words (`int`, defaults to 50): requested caption length in words.
        cache_dir (`str`, *optional*): caption cache directory (or `.sqlite` file); defaults to
            `$MMFT_HF_CACHE` or `$HF_HOME/mmft_hf`. Shards and concurrent runs may share it: each caption is paid
            for once (captions another run is making, or an open batch holds, are waited for or collected).
        num_shards (`int`, defaults to 1): split the work into this many contiguous shards...
        shard_index (`int`, defaults to 0): ...and caption only this one. Merge the results with
            `merge_caption_shards`, or simply rerun with `num_shards=1` afterwards: every caption is then a
            cache hit.
        strict (`bool`, defaults to `False`): raise `CaptioningError` when any caption is missing, even for rows
            whose image cannot be read.
        allow_missing (`bool`, defaults to `False`): return the rows with the captions they have when captions are
            still missing for server or answer reasons after all passes. By default that raises `CaptioningError`
            (nothing is returned, so nothing incomplete is written or pushed). Rows whose image is missing or cannot
            be read are reported and kept with fewer captions either way (unless `strict`).
        max_passes (`int`, defaults to 3): passes over still-missing captions; answers the quality gate rejects
            (empty, refused, cut by the token limit, absurdly long) are asked again in the next pass.
        retry_resize (`tuple[int, int]`, *optional*, defaults to `(224, 512)`): on retry passes, send the image
            resized to a random square side in this range (the reference's retry); `None` keeps it as is.
        chunk_size (`int`, defaults to 256): requests claimed and handed to a synchronous captioner at once (bounds
            decoded images in memory).
        seed (`int`, defaults to 0): seeds the retry resizing.
        show_progress (`bool`, defaults to `True`): show a tqdm bar.
        one_request_per_image (`bool`, defaults to `False`): ask for every caption type of an image in one request
            (a JSON reply; the image's tokens are paid once instead of once per type), in a first pass on top of
            `max_passes`. Each caption is cached under its per-type key, its origin (the joint prompt) recorded;
            types a reply lacks are then requested per type. Off by default: the paper's protocol asks per type.

    Returns:
        `datasets.Dataset`: the input rows (this shard's rows when sharding), all columns kept, plus
        `caption_column` (`List(string)`), ordered type-major: the `captions_per_type` captions of the first type,
        then of the second, and so on. With several captioners the order is captioner-major (all captions of the
        first captioner, type-major, then of the second, ...), and `sources_column` (`List(string)`, parallel to it)
        names each caption's captioner; missing captions are left out of both lists alike. `caption_provenance(
        result)` gives the provenance (every captioner's identity under `"captioner"`, a list when there are several)
        and `result.caption_summary` the `CaptioningSummary` of this call (summed over the captioners).

    Raises:
        [`~captioners.base.CaptionerUnavailableError`]: the backend cannot answer (unreachable server, rejected key,
            unknown model, or a server that stopped answering mid-run); the one-line message adds how many captions
            are cached and that the same call resumes.
        [`CaptioningInterrupted`]: on Ctrl-C (a `KeyboardInterrupt`), with the same one-line message.
        [`CaptioningError`]: captions still missing (see `allow_missing` and `strict`).
        [`~engine.OpenBatchError`]: captions are in an open batch of another provider that this run cannot poll.
        `ValueError`: invalid arguments or data (before anything is requested).
    """
    started = time.monotonic()
    settings = caption_settings(
        domain=domain,
        caption_types=caption_types,
        captions_per_type=captions_per_type,
        image_column=image_column,
        label_column=label_column,
        class_names=class_names,
        prompt_template=prompt_template,
        words=words,
    )
    names = check_settings(dataset, captioner, settings)
    captioners = as_captioners(captioner)
    several = len(captioners) > 1
    for column in (caption_column, sources_column) if several else (caption_column,):
        if column in dataset.column_names:
            raise ValueError(
                f"The dataset already has a {column!r} column. Remove it (dataset.remove_columns({column!r})) or pass "
                f"another {'caption_column' if column == caption_column else 'sources_column'}."
            )
    if not isinstance(max_passes, int) or max_passes < 1:
        raise ValueError(f"max_passes must be a positive integer, got {max_passes!r}.")
    start, stop = shard_bounds(len(dataset), num_shards, shard_index)
    part = dataset.shard(num_shards, shard_index, contiguous=True) if num_shards > 1 else dataset
    all_rows = caption_rows_per_captioner(
        part, captioners, settings, names, first_row=start, retry_resize=retry_resize, seed=seed
    )
    identities = [item.cache_identity() for item in captioners]
    sources = [caption_source(identity) for identity in identities]

    per_row = len(settings.slots) * len(captioners)
    summary = CaptioningSummary(num_rows=len(part), captions_expected=len(part) * per_row)
    cache = CaptionCache(cache_dir if cache_dir is not None else default_cache_dir())
    summary.cache_path = cache.path
    claim_owner, engines, running = new_claim_owner(), [], None
    claim_keeper = ClaimKeeper(cache.path, claim_owner, CLAIM_TTL_S)
    try:
        with SubmissionLedger(cache) as ledger:
            for item, rows in zip(captioners, all_rows, strict=True):  # every cache hit is read first...
                engines.append(
                    CaptionEngine(
                        item,
                        rows,
                        cache,
                        ledger,
                        summary,
                        claim_owner=claim_owner,
                        poller=as_batch_captioner(item),
                        chunk_size=chunk_size,
                        show_progress=show_progress,
                    )  # fmt: skip
                )
            for running, engine in enumerate(engines):  # ...then one captioner after another pays for the rest
                if several and engine.missing():
                    logger.info("Captioner %s (%d of %d).", sources[running], running + 1, len(captioners))
                engine.run(max_passes, one_request_per_image)
    except CaptionerUnavailableError as error:  # the backend cannot answer at all: stop, saying how to resume
        who = f"captioner {sources[running]}: " if several and running is not None else ""
        raise type(error)(f"{who}{error} {_resume_note(engines, summary.captions_expected, cache)}") from None
    except KeyboardInterrupt:
        raise CaptioningInterrupted(
            f"Interrupted. {_resume_note(engines, summary.captions_expected, cache)}"
        ) from None
    finally:
        claim_keeper.close()
        cache.close()

    missing, unreadable = [], []
    columns, column_sources = [[] for _ in range(len(part))], [[] for _ in range(len(part))]
    for engine, source in zip(engines, sources, strict=True):  # captioner-major, then type-major, as the slots
        server, images = engine.failures()
        for failure in server + images if several else ():
            failure.source = source
        missing += server
        unreadable += images
        for row, row_texts in enumerate(engine.texts):
            kept = [text for text in row_texts if text is not None]
            columns[row] += kept
            column_sources[row] += [source] * len(kept)
    summary.failures = missing + unreadable
    summary.captions_done = sum(len(row) for row in columns)
    summary.rows_without_captions = sum(not row for row in columns)
    summary.rows_incomplete = sum(0 < len(row) < per_row for row in columns)
    summary.elapsed_s = time.monotonic() - started
    log_failures(summary.failures, "missing")
    logger.debug("%s", summary)  # callers print it (the CLI does), or read result.caption_summary
    if (missing and not allow_missing) or (strict and summary.failures):
        hint = "" if strict else ", or pass allow_missing=True (--allow_missing) to keep the rows without them"
        raise CaptioningError(summary.failures, summary, hint)

    shard = {"num_shards": num_shards, "shard_index": shard_index, "start": start, "stop": stop}
    result = part.add_column(caption_column, columns, feature=datasets.List(datasets.Value("string")))
    if several:
        result = result.add_column(sources_column, column_sources, feature=datasets.List(datasets.Value("string")))
    provenance = make_provenance(
        identities if several else identities[0],
        settings,
        shard if num_shards > 1 else None,
        caption_counts(columns, per_row),
    )
    result = attach_provenance(result, provenance, caption_column)
    result.caption_summary = summary
    return result


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
        differing = differing_settings(reference, provenance)
        if differing:
            raise ValueError(f"Shard {position} was made with different settings ({differing}) than shard 0.")
    num_shards = provenances[0]["shard"]["num_shards"]
    indices = sorted(p["shard"]["shard_index"] for p in provenances)
    if indices != list(range(num_shards)) or any(p["shard"]["num_shards"] != num_shards for p in provenances):
        raise ValueError(f"Expected shard indices 0..{num_shards - 1} once each, got {indices}.")
    order = sorted(range(len(shards)), key=lambda i: provenances[i]["shard"]["shard_index"])
    plain = datasets.List(datasets.Value("string"))
    merged = datasets.concatenate_datasets([shards[i].cast_column(caption_column, plain) for i in order])
    per_row = captions_per_row(reference)
    provenance = {**provenances[order[0]], "shard": None}
    provenance["counts"] = caption_counts([list(row) for row in merged[caption_column]], per_row)
    return attach_provenance(merged, provenance, caption_column)
