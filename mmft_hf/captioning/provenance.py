"""Caption settings and provenance, in one place: what `caption_dataset` records, the builder declares, the trainer
and the evaluation fingerprint read.

Provenance (captioner identity, prompt template, domain, caption types, counts) travels with a captioned dataset in
two places: `info.description` (kept by `save_to_disk`) and the `id` of the caption column's string feature, which
datasets writes into the Parquet schema and the README `dataset_info`, so it also survives `push_to_hub`,
`load_dataset` and `map`. Read it back with `caption_provenance(dataset)`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import datasets

from ..version import __version__
from .prompts import CAPTION_TYPES, DEFAULT_WORDS, PROMPT_TEMPLATE

PROVENANCE_FORMAT = "mmft-hf-captions/1"
IMAGE_KEY = "sha256 of the image bytes as encoded in the dataset"
CAPTION_ORDER = "type-major: all captions of caption_types[0], then caption_types[1], ..."
MULTI_CAPTION_ORDER = (
    "captioner-major, then type-major: all captions of captioner[0] (type-major), then of captioner[1], ...; "
    "caption_sources names the captioner of each caption"
)
SOURCES_COLUMN = "caption_sources"
# Provenance entries that differ between parts of one job (shards, splits, versions) without the captions differing.
VOLATILE_PROVENANCE_KEYS = ("shard", "counts", "mmft_hf_version")
_DESCRIPTION_MARKER = "mmft-hf caption provenance: "


@dataclass(frozen=True)
class CaptionSettings:
    """Everything that shapes the captions of a dataset but the captioner: recorded in the provenance.

    Args:
        domain (`str`): the prompt's domain word, e.g. `"textures"`.
        caption_types (`Sequence[str]`, defaults to `("visual", "shape", "texture")`): characteristic words.
        captions_per_type (`int`, defaults to 1): distinct captions per image and type.
        words (`int`, defaults to 50): requested caption length in words.
        prompt_template (`str`, defaults to `PROMPT_TEMPLATE`): the template containing `{class_name}`.
        class_names (`Sequence[str]`, *optional*): names per label id overriding the dataset's own.
        image_column (`str`, defaults to `"image"`), label_column (`str`, defaults to `"label"`): the columns read.
    """

    domain: str
    caption_types: tuple[str, ...] = tuple(CAPTION_TYPES)
    captions_per_type: int = 1
    words: int = DEFAULT_WORDS
    prompt_template: str = PROMPT_TEMPLATE
    class_names: tuple[str, ...] | None = None
    image_column: str = "image"
    label_column: str = "label"
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def slots(self) -> list[tuple[str, int]]:
        """`(caption type, copy)` of each caption of a row, type-major (the caption column's order)."""
        return [(kind, copy) for kind in self.caption_types for copy in range(self.captions_per_type)]

    def to_dict(self) -> dict:
        """JSON-ready settings as recorded in the provenance, including the caption order and `extra` entries."""
        return {
            "prompt_template": self.prompt_template,
            "domain": self.domain,
            "caption_types": list(self.caption_types),
            "captions_per_type": self.captions_per_type,
            "caption_order": CAPTION_ORDER,
            "words": self.words,
            "class_names": list(self.class_names) if self.class_names is not None else None,
            "image_column": self.image_column,
            "label_column": self.label_column,
            **self.extra,
        }


def caption_source(identity: dict) -> str:
    """The name of a captioner in a `caption_sources` column: its model and a short hash of its whole identity
    (`"gpt-4o-mini#1a2b3c4d"`), so two settings of one model (another temperature, `cache_tag`, ...) stay apart."""
    model = identity.get("model") or identity.get("spec") or identity.get("backend") or "captioner"
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return f"{model}#{hashlib.sha256(text.encode('utf-8')).hexdigest()[:8]}"


def make_provenance(captioner_identity, settings: CaptionSettings, shard: dict | None, counts: dict | None) -> dict:
    """The provenance record of a captioned dataset (or of one shard of it).

    `captioner_identity` is one captioner's identity (`dict`), recorded as today under `"captioner"`; or a list of
    identities for a dataset captioned by several, recorded as that list, with `"caption_sources"` (their names, see
    `caption_source`) and the captioner-major `"caption_order"`.
    """
    several = isinstance(captioner_identity, (list, tuple))
    provenance = {
        "format": PROVENANCE_FORMAT,
        "mmft_hf_version": __version__,
        "captioner": list(captioner_identity) if several else captioner_identity,
        **settings.to_dict(),
        "image_key": IMAGE_KEY,
        "shard": shard,
        "counts": counts,
    }
    if several:
        provenance["caption_sources"] = [caption_source(identity) for identity in captioner_identity]
        provenance["caption_order"] = MULTI_CAPTION_ORDER
    return provenance


def provenance_captioners(provenance: dict) -> list[dict]:
    """The identity of every captioner a provenance records, in caption order (one for a single captioner)."""
    captioner = provenance.get("captioner")
    if isinstance(captioner, list):
        return captioner
    return [captioner] if captioner else []


def captions_per_row(provenance: dict) -> int:
    """Captions a complete row holds: captioners × caption types × captions per type."""
    return (
        max(1, len(provenance_captioners(provenance)))
        * len(provenance["caption_types"])
        * provenance["captions_per_type"]
    )


def caption_counts(columns: list[list[str]], per_row: int) -> dict:
    """Rows, captions and incomplete rows of a caption column (`per_row` captions expected per row)."""
    return {
        "rows": len(columns),
        "captions": sum(len(row) for row in columns),
        "captions_expected": len(columns) * per_row,
        "rows_incomplete": sum(0 < len(row) < per_row for row in columns),
        "rows_without_captions": sum(not row for row in columns),
    }


def differing_settings(reference: dict, other: dict, ignore: Sequence[str] = VOLATILE_PROVENANCE_KEYS) -> list[str]:
    """The provenance keys whose values differ between `reference` and `other`, sorted, skipping `ignore`."""
    return sorted(k for k in set(reference) | set(other) if k not in ignore and reference.get(k) != other.get(k))


def attach_provenance(dataset: datasets.Dataset, provenance: dict, caption_column: str = "captions"):
    """Returns `dataset` with `provenance` stored in its caption feature's `id` and in `info.description`."""
    text = json.dumps(provenance, sort_keys=True, ensure_ascii=False, default=str)
    feature = datasets.List(datasets.Value("string", id=text))
    if dataset.features[caption_column] != feature:
        dataset = dataset.cast_column(caption_column, feature)
    dataset.info.description = (
        f"Images with synthetic captions made by mmft-hf for MMFT fine-tuning.\n{_DESCRIPTION_MARKER}{text}"
    )
    return dataset


def provenance_feature(provenance: dict) -> datasets.List:
    """The caption column's feature carrying `provenance` (as `attach_provenance` writes it)."""
    return datasets.List(
        datasets.Value("string", id=json.dumps(provenance, sort_keys=True, ensure_ascii=False, default=str))
    )


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
