"""Caption statistics: word and token lengths per caption type, the 77-token overflow, the caption tokens a training
text reads under each `caption_sampling`, and CLIPScore (method.md §9)."""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import datasets
import numpy as np
import torch

from ..encoders import CLIP_CONTEXT_LENGTH, encode_texts, max_text_length, model_device, pooled_output
from ..images import to_rgb
from .cache import CaptionCache
from .prompts import (
    normalize_class_name,
)
from .sentences import CAPTION_SAMPLINGS, caption_units

PERCENTILES = (5, 25, 50, 75, 95)
logger = logging.getLogger(__name__)


def _distribution(values: Sequence[float]) -> dict:
    if not len(values):
        return {"count": 0}
    array = np.asarray(values, dtype=np.float64)
    stats = {
        "count": int(array.size),
        "mean": float(array.mean()),
        "min": float(array.min()),
        "max": float(array.max()),
    }
    stats.update({f"p{q}": float(np.percentile(array, q)) for q in PERCENTILES})
    return stats


def _slot_types(dataset: datasets.Dataset, caption_column: str, caption_types) -> list[str] | None:
    """The caption type of each position of a complete row: `caption_types` as given, else from the provenance
    (type-major, repeated for each captioner of a several-captioner dataset: captioner-major)."""
    from .provenance import caption_provenance, provenance_captioners

    if caption_types is None:
        provenance = caption_provenance(dataset, caption_column)
        if provenance is None:
            return None
        per_captioner = [kind for kind in provenance["caption_types"] for _ in range(provenance["captions_per_type"])]
        return per_captioner * max(1, len(provenance_captioners(provenance)))
    return list(caption_types)


def _tokens_read(tokenizer, pairs: list[tuple[str, str]], max_length: int) -> dict:
    """How many tokens of each caption a training text reads once truncated to `max_length`, per caption sampling.

    A text is `"{prefix} {unit}"` (the unit alone without a prefix), the unit a caption or one of its sentences
    (`caption_units`). The caption tokens it reads are its truncated length minus the prefix's length (both count
    the start and end tokens, which truncation keeps).

    Returns:
        `dict`: per sampling, `per_draw` (tokens of the caption one draw reads: for sentences, the mean over the
        caption's sentences, each drawn equally often), `units_per_caption` and `fraction_read` (the share of all
        caption tokens that some draw reads over a run: what truncation never cuts), with `caption_tokens`, the
        captions' own lengths without the start and end tokens.
    """
    specials = len(tokenizer("")["input_ids"])
    caption_tokens = [len(ids) - specials for ids in tokenizer([c for c, _ in pairs], verbose=False)["input_ids"]]
    prefixes = sorted({prefix for _, prefix in pairs})
    prefix_tokens = dict(zip(prefixes, (len(ids) for ids in tokenizer(prefixes)["input_ids"]), strict=True))
    report = {"caption_tokens": _distribution(caption_tokens)}
    for sampling in CAPTION_SAMPLINGS:
        units = [caption_units(caption, sampling) for caption, _ in pairs]
        texts = [f"{prefix} {unit}".strip() for (_, prefix), row in zip(pairs, units, strict=True) for unit in row]
        lengths = iter(len(ids) for ids in tokenizer(texts, verbose=False)["input_ids"]) if texts else iter(())
        per_draw, reachable = [], []
        for (_, prefix), row, total in zip(pairs, units, caption_tokens, strict=True):
            read = [max(0, min(next(lengths), max_length) - prefix_tokens[prefix]) for _ in row]
            per_draw.append(sum(read) / len(read) if read else 0.0)
            reachable.append(min(sum(read), total))
        report[sampling] = {
            "per_draw": _distribution(per_draw),
            "units_per_caption": _distribution([len(row) for row in units]),
            "fraction_read": sum(reachable) / max(sum(caption_tokens), 1),
        }
    return report


def caption_stats(
    dataset: datasets.Dataset,
    tokenizer=None,
    class_template: str = "a photo of a {}.",
    caption_column: str = "captions",
    label_column: str = "label",
    caption_types: Sequence[str] | None = None,
    max_length: int | None = None,
    model=None,
) -> dict:
    """Length statistics of the captions, per caption type and over all captions.

    Captions are attributed to types by position (type-major, as `caption_dataset` writes them). A row missing
    some captions has shifted positions, so per-type statistics use complete rows only; `"all"` uses every caption.

    With a tokenizer, `"tokens_read"` says how much of the captions training actually reads under each
    `caption_sampling`: a whole caption is cut at `max_length` tokens with its prefix, while sentence sampling reads
    one sentence per draw but, over a run, every sentence that fits.

    Args:
        dataset (`datasets.Dataset`): a captioned dataset.
        tokenizer (*optional*): a CLIP tokenizer; without it only word counts are computed.
        class_template (`str`, defaults to `"a photo of a {}."`): the class prefix put before each caption in
            MMFT mode; token lengths "with prefix" count `f"{class_template.format(name)} {caption}"`.
        caption_column (`str`, defaults to `"captions"`): the caption column.
        label_column (`str`, defaults to `"label"`): a `ClassLabel` column (names normalised for the prefix).
        caption_types (`Sequence[str]`, *optional*): the type of each caption position (e.g. `["visual", "shape",
            "texture"]`); read from the provenance when omitted. Without either, only `"all"` is reported.
        max_length (`int`, *optional*): the text limit of the model the captions train, counting the start and end
            tokens; defaults to the limit training uses, `mmft_hf.encoders.max_text_length(model, tokenizer)` (77 for
            CLIP; without a tokenizer, 77).
        model (*optional*): the dual encoder (or its config) the captions train; its text positions bound the
            default `max_length` (64 for a SigLIP whose tokenizer allows 77).

    Returns:
        `dict`: `{type or "all": {"captions", "words": {...}, "tokens": {...}, "tokens_with_prefix": {...},
        "fraction_over_max_length", "tokens_read": {"caption_tokens": {...}, "caption": {...}, "sentence": {...}}}}`
        where each distribution has `count`, `mean`, `min`, `max`, `p5` .. `p95` (`tokens_read[sampling]` holds
        `per_draw`, `units_per_caption` and `fraction_read`, see `_tokens_read`), plus `"rows"`,
        `"rows_incomplete"` and `"max_length"`.
    """
    if caption_column not in dataset.column_names:
        raise ValueError(f"Column {caption_column!r} not found; the dataset has {dataset.column_names}.")
    if max_length is None:  # the limit the collator and the prototypes use
        max_length = CLIP_CONTEXT_LENGTH if tokenizer is None else max_text_length(model, tokenizer)
    slot_types = _slot_types(dataset, caption_column, caption_types)
    label_feature = dataset.features.get(label_column)
    names = label_feature.names if isinstance(label_feature, datasets.ClassLabel) else None
    rows = dataset.select_columns([c for c in (caption_column, label_column) if c in dataset.column_names])
    groups: dict[str, list[tuple[str, str]]] = {"all": []}
    incomplete = 0
    for row in rows:
        captions = row[caption_column] or []
        label = row.get(label_column)
        name = names[label] if names is not None and label is not None else str(label)
        prefix = class_template.format(normalize_class_name(name)) if label is not None else ""
        pairs = [(caption, prefix) for caption in captions]
        groups["all"].extend(pairs)
        if slot_types is None:
            continue
        if len(captions) != len(slot_types):
            incomplete += 1
            continue
        for kind, pair in zip(slot_types, pairs, strict=True):
            groups.setdefault(kind, []).append(pair)
    report = {"rows": len(dataset), "rows_incomplete": incomplete if slot_types else None, "max_length": max_length}
    for kind, pairs in groups.items():
        entry = {"captions": len(pairs), "words": _distribution([len(caption.split()) for caption, _ in pairs])}
        if tokenizer is not None and pairs:
            # no truncation: the point is to see how much a 77-token model would cut
            plain = tokenizer([caption for caption, _ in pairs], truncation=False)["input_ids"]
            prefixed = tokenizer([f"{prefix} {caption}".strip() for caption, prefix in pairs], truncation=False)
            prefixed = [len(ids) for ids in prefixed["input_ids"]]
            entry["tokens"] = _distribution([len(ids) for ids in plain])
            entry["tokens_with_prefix"] = _distribution(prefixed)
            entry["fraction_over_max_length"] = sum(n > max_length for n in prefixed) / len(prefixed)
            entry["tokens_read"] = _tokens_read(tokenizer, pairs, max_length)
        report[kind] = entry
    return report


def _image_embeddings(model, processor, images: Sequence) -> torch.Tensor:
    """L2-normalised image embeddings `[len(images), dim]` (float32), one forward pass."""
    batch = [to_rgb(image) for image in images]
    pixels = processor.image_processor(images=batch, return_tensors="pt")["pixel_values"].to(model_device(model))
    return torch.nn.functional.normalize(pooled_output(model.get_image_features(pixel_values=pixels)).float(), dim=-1)


def _clip_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> list[float]:
    """`2.5 * max(cos, 0)` of row-aligned normalised embeddings."""
    return (2.5 * (image_embeds * text_embeds).sum(-1).clamp(min=0)).tolist()


@torch.no_grad()
def clip_score(model, processor, images: Sequence, captions: Sequence[str], batch_size: int = 64) -> list[float]:
    """CLIPScore of each (image, caption) pair: `2.5 * max(cos(image, text), 0)` (Hessel et al., 2021).

    Images are converted with [`mmft_hf.images.to_rgb`]; texts are truncated to the model's context length with the
    tokenizer, which keeps `<|endoftext|>` (CLIP pools there). Works offline with any local CLIP-style model that
    has `get_image_features`/`get_text_features`.

    Args:
        model: e.g. `CLIPModel`, in eval mode.
        processor: its `CLIPProcessor` (tokenizer + image processor).
        images (`Sequence[PIL.Image.Image]`): the images.
        captions (`Sequence[str]`): one caption per image.
        batch_size (`int`, defaults to 64): pairs per forward pass.

    Returns:
        `list[float]`: one score per pair.
    """
    if len(images) != len(captions):
        raise ValueError(f"Got {len(images)} images but {len(captions)} captions; pass one caption per image.")
    tokenizer = getattr(processor, "tokenizer", processor)
    max_text_length(model, tokenizer)  # fails early on a tokenizer without a usable length
    scores = []
    for start in range(0, len(images), batch_size):
        image_embeds = _image_embeddings(model, processor, images[start : start + batch_size])
        text_embeds = encode_texts(model, tokenizer, list(captions[start : start + batch_size]), batch_size=batch_size)
        scores.extend(_clip_scores(image_embeds, text_embeds))
    return scores


@torch.no_grad()
def dataset_clip_score(
    dataset: datasets.Dataset,
    model,
    processor,
    caption_column: str = "captions",
    image_column: str = "image",
    caption_types: Sequence[str] | None = None,
    batch_size: int = 64,
) -> dict:
    """Mean CLIPScore per caption type (complete rows only, as in `caption_stats`) and over all captions.

    Rows are read `batch_size` at a time: each image is decoded and embedded once, and scored against the
    embeddings of all its captions, so memory is bounded by one batch.

    Args:
        dataset (`datasets.Dataset`): a captioned dataset.
        model: e.g. `CLIPModel`, in eval mode.
        processor: its `CLIPProcessor` (tokenizer + image processor).
        caption_column (`str`, defaults to `"captions"`): the caption column.
        image_column (`str`, defaults to `"image"`): the image column.
        caption_types (`Sequence[str]`, *optional*): the type of each caption position; read from the provenance
            when omitted. Without either, only `"all"` is reported.
        batch_size (`int`, defaults to 64): images per forward pass (and texts per text forward pass).

    Returns:
        `dict`: `{type or "all": {"count", "mean", "min", "max", p5 .. p95}}`.
    """
    slot_types = _slot_types(dataset, caption_column, caption_types)
    tokenizer = getattr(processor, "tokenizer", processor)
    max_text_length(model, tokenizer)  # fails early on a tokenizer without a usable length
    scores, kinds = [], []
    for batch in dataset.select_columns([image_column, caption_column]).iter(batch_size=batch_size):
        rows = [
            (image, captions)
            for image, captions in zip(batch[image_column], batch[caption_column], strict=True)
            if captions
        ]
        if not rows:
            continue
        texts, owners = [], []
        for owner, (_, captions) in enumerate(rows):
            complete = slot_types is not None and len(captions) == len(slot_types)
            for position, caption in enumerate(captions):
                texts.append(caption)
                owners.append(owner)
                kinds.append(slot_types[position] if complete else None)
        image_embeds = _image_embeddings(model, processor, [image for image, _ in rows])
        text_embeds = encode_texts(model, tokenizer, texts, batch_size=batch_size)
        scores.extend(_clip_scores(image_embeds[owners], text_embeds))
    report = {"all": _distribution(scores)}
    for kind in dict.fromkeys(k for k in kinds if k is not None):
        report[kind] = _distribution([s for s, k in zip(scores, kinds, strict=True) if k == kind])
    return report


# ---------------------------------------------------------------------- cost estimate


@dataclass
class CostEstimate:
    """What captioning a whole dataset will cost, extrapolated from a captioned sample's reported token usage.

    Args:
        num_rows (`int`): rows of the dataset.
        sample_rows (`int`): rows captioned for the estimate (their captions are cached, so not wasted).
        sample_requests (`int`): requests the sample made now (0 when it was cached already).
        one_request_per_image (`bool`): the request mode estimated.
        joint_share (`float`): the share of the sample's requests that were joint (one per image). It differs from
            the mode asked for when the sample rows were captioned earlier in the other mode (a warning says so).
        requests (`float`): requests for the whole dataset.
        input_tokens (`float`): input (prompt) tokens for the whole dataset.
        output_tokens (`float`): output (completion) tokens for the whole dataset.
        modes (`dict[str, dict]`): per sending mode (`"synchronous"`, `"batch"`): `cost` (in the prices' currency)
            and `wall_time_s` (`None` when unknown: a sample read from the cache, or a batch, which ends within
            its completion window), plus `batches` for the batch mode.
    """

    num_rows: int
    sample_rows: int
    sample_requests: int
    one_request_per_image: bool
    joint_share: float
    requests: float
    input_tokens: float
    output_tokens: float
    modes: dict

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        kind = "one request per image" if self.one_request_per_image else "one request per caption type"
        lines = [
            f"Estimate for {self.num_rows} rows ({kind}) from {self.sample_rows} sample rows: "
            f"{self.requests:,.0f} requests, {self.input_tokens:,.0f} input and {self.output_tokens:,.0f} output tokens."
        ]
        for mode, values in self.modes.items():
            wall = values.get("wall_time_s")
            if wall is None:
                wall = values.get("wall_time_note", "unknown")
            else:
                wall = f"{wall / 3600:.2f} h" if wall >= 3600 else f"{wall:.1f} s"
            extra = f", {values['batches']} batch(es)" if "batches" in values else ""
            lines.append(f"  {mode}: cost {values['cost']:.4g}, wall time {wall}{extra}")
        return "\n".join(lines)


def stratified_sample(dataset: datasets.Dataset, label_column: str, num_rows: int, seed: int = 0) -> list[int]:
    """Row indices of a sample with the classes as evenly represented as `num_rows` allows (round robin over
    the classes, each class's rows shuffled with `seed`), sorted."""
    rng = np.random.default_rng(seed)
    by_label: dict = {}
    for index, label in enumerate(dataset[label_column]):
        by_label.setdefault(label, []).append(index)
    queues = [list(rng.permutation(rows)) for _, rows in sorted(by_label.items(), key=lambda item: str(item[0]))]
    chosen = []
    while len(chosen) < min(num_rows, len(dataset)):
        for queue in queues:
            if queue and len(chosen) < num_rows:
                chosen.append(int(queue.pop()))
    return sorted(chosen)


def estimate_captioning_cost(
    dataset: datasets.Dataset,
    captioner,
    *,
    domain: str,
    sample_rows: int = 20,
    price_per_million_input_tokens: float = 0.0,
    price_per_million_output_tokens: float = 0.0,
    batch_discount: float = 0.5,
    one_request_per_image: bool = False,
    label_column: str = "label",
    seed: int = 0,
    show_progress: bool = False,
    **caption_kwargs,
) -> CostEstimate:
    """Captions a small stratified sample and extrapolates requests, tokens, cost and wall time to the dataset.

    The sample spreads evenly over the classes (`stratified_sample`), so that a small class is measured too; each
    sampled row is then weighted by the share of the dataset it stands for (its class's size over the rows sampled
    from that class), so that a large class counts as much as it will cost.

    The sample goes through `caption_dataset` (so through the cache: it is paid once, and reused by the full
    run). A batch captioner's sample is sent synchronously, to answer now; its captions are the same. Tokens are
    the usage the server reported, read back from the cache, so an estimate repeated later costs nothing.

    Args:
        dataset (`datasets.Dataset`): the split to caption.
        captioner (`Captioner`): the captioner of the full run.
        domain (`str`): the prompt's domain word.
        sample_rows (`int`, defaults to 20): rows to caption, spread evenly over the classes.
        price_per_million_input_tokens (`float`, defaults to 0.0): the provider's synchronous input price.
        price_per_million_output_tokens (`float`, defaults to 0.0): the provider's synchronous output price.
        batch_discount (`float`, defaults to 0.5): the fraction of the price the Batch API takes off.
        one_request_per_image (`bool`, defaults to `False`): estimate the joint-request mode.
        label_column (`str`, defaults to `"label"`): the label column (the strata).
        seed (`int`, defaults to 0): seeds the sample.
        show_progress (`bool`, defaults to `False`): show the sample's progress bar.
        **caption_kwargs: the other `caption_dataset` arguments of the full run (`caption_types`, `cache_dir`, ...).

    Returns:
        `CostEstimate`: the extrapolation; `str()` gives a short table.
    """
    from .caption import caption_dataset, caption_keys
    from .captioners.base import BatchCaptioner
    from .ledger import SubmissionLedger

    if isinstance(captioner, (list, tuple)):
        raise TypeError(
            f"estimate_captioning_cost takes one captioner, got a {type(captioner).__name__} of {len(captioner)}: "
            "estimate each captioner of a several-captioner run in turn and add the estimates (their captions are "
            "cached and paid separately)."
        )
    if not 0 <= batch_discount < 1:
        raise ValueError(f"batch_discount must be in [0, 1), got {batch_discount}.")
    if not isinstance(sample_rows, int) or sample_rows < 1:
        raise ValueError(f"sample_rows must be a positive integer, got {sample_rows!r}.")
    sample = dataset.select(stratified_sample(dataset, label_column, sample_rows, seed))
    # a batch captioner's sample is sent synchronously (same cache identity): it answers now
    sample_captioner = captioner.synchronous() if isinstance(captioner, BatchCaptioner) else captioner
    result = caption_dataset(
        sample,
        sample_captioner,
        domain=domain,
        label_column=label_column,
        one_request_per_image=one_request_per_image,
        show_progress=show_progress,
        **caption_kwargs,
    )
    key_settings = {
        name: caption_kwargs[name]
        for name in ("caption_types", "captions_per_type", "image_column", "class_names", "prompt_template", "words")
        if name in caption_kwargs
    }
    keys = caption_keys(sample, captioner, domain=domain, label_column=label_column, **key_settings)
    requests = input_tokens = output_tokens = joint = 0
    cache = CaptionCache(result.caption_summary.cache_path)
    try:
        with SubmissionLedger(cache) as ledger:
            usages = ledger.usages(key for row in keys for key in row if key)
    finally:
        cache.close()
    per_type = key_settings.get("captions_per_type", 1)
    # Each sampled row stands for the rows of its class: class size / rows sampled from it. Classes left out of a
    # sample smaller than the number of classes are covered by scaling to the whole dataset.
    class_sizes, sampled = Counter(dataset[label_column]), Counter(sample[label_column])
    coverage = len(dataset) / sum(class_sizes[label] for label in sampled)
    weights = [coverage * class_sizes[label] / sampled[label] for label in sample[label_column]]
    sample_requests = 0
    for row_keys, weight in zip(keys, weights, strict=True):
        joint_requests = set()
        for index, key in enumerate(row_keys):
            if key not in usages:
                continue  # a failed caption: its tokens are not known
            usage, origin = usages[key]
            if origin is not None:  # the captions of one joint request (one copy) share its usage: count it once
                request = (origin["prompt"], index % per_type)
                if request in joint_requests:
                    continue
                joint_requests.add(request)
                usage = origin.get("usage") or {}
                joint += 1
            sample_requests += 1
            requests += weight
            input_tokens += weight * usage.get("prompt_tokens", 0)
            output_tokens += weight * usage.get("completion_tokens", 0)
    joint_share = joint / sample_requests if sample_requests else 0.0
    if (one_request_per_image and sample_requests and not joint) or (not one_request_per_image and joint):
        logger.warning(
            "The sample's captions were made %s earlier (%.0f %% joint requests), so the estimate measures that "
            "mode, not the one asked for; pass another seed to sample rows not captioned yet.",
            "per type" if one_request_per_image else "with one request per image",
            100 * joint_share,
        )
    cost = (input_tokens * price_per_million_input_tokens + output_tokens * price_per_million_output_tokens) / 1e6
    summary = result.caption_summary
    wall = summary.elapsed_s / summary.requests * requests if summary.requests else None
    per_batch = getattr(captioner, "max_requests_per_batch", 50_000)
    modes = {
        "synchronous": {"cost": cost, "wall_time_s": wall},
        "batch": {
            "cost": cost * (1 - batch_discount),
            "wall_time_s": None,
            "wall_time_note": f"within the completion window ({getattr(captioner, 'completion_window', '24h')})",
            "batches": max(1, math.ceil(requests / per_batch)),
        },
    }
    if wall is None:
        modes["synchronous"]["wall_time_note"] = "unknown (the sample was cached)"
    return CostEstimate(
        len(dataset),
        len(sample),
        summary.requests,
        one_request_per_image,
        joint_share,
        requests,
        input_tokens,
        output_tokens,
        modes,
    )
