"""Caption statistics: word and token lengths per caption type, the 77-token overflow, and CLIPScore (method.md §9)."""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import numpy as np
import torch

from ..encoders import encode_texts, max_text_length, model_device, pooled_output
from ..images import to_rgb
from .prompts import normalize_class_name

PERCENTILES = (5, 25, 50, 75, 95)


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
    from .caption import caption_provenance

    if caption_types is None:
        provenance = caption_provenance(dataset, caption_column)
        if provenance is None:
            return None
        return [kind for kind in provenance["caption_types"] for _ in range(provenance["captions_per_type"])]
    return list(caption_types)


def caption_stats(
    dataset: datasets.Dataset,
    tokenizer=None,
    class_template: str = "a photo of a {}.",
    caption_column: str = "captions",
    label_column: str = "label",
    caption_types: Sequence[str] | None = None,
    max_length: int = 77,
) -> dict:
    """Length statistics of the captions, per caption type and over all captions.

    Captions are attributed to types by position (type-major, as `caption_dataset` writes them). A row missing
    some captions has shifted positions, so per-type statistics use complete rows only; `"all"` uses every caption.

    Args:
        dataset (`datasets.Dataset`): a captioned dataset.
        tokenizer (*optional*): a CLIP tokenizer; without it only word counts are computed.
        class_template (`str`, defaults to `"a photo of a {}."`): the class prefix put before each caption in
            MMFT mode; token lengths "with prefix" count `f"{class_template.format(name)} {caption}"`.
        caption_column (`str`, defaults to `"captions"`): the caption column.
        label_column (`str`, defaults to `"label"`): a `ClassLabel` column (names normalised for the prefix).
        caption_types (`Sequence[str]`, *optional*): the type of each caption position (e.g. `["visual", "shape",
            "texture"]`); read from the provenance when omitted. Without either, only `"all"` is reported.
        max_length (`int`, defaults to 77): CLIP's context length, counting `<|startoftext|>` and `<|endoftext|>`.

    Returns:
        `dict`: `{type or "all": {"captions", "words": {...}, "tokens": {...}, "tokens_with_prefix": {...},
        "fraction_over_max_length"}}` where each distribution has `count`, `mean`, `min`, `max`, `p5` .. `p95`,
        plus `"rows"`, `"rows_incomplete"` and `"max_length"`.
    """
    if caption_column not in dataset.column_names:
        raise ValueError(f"Column {caption_column!r} not found; the dataset has {dataset.column_names}.")
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
