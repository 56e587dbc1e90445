"""A datasets builder for captioned image datasets, presets for the 13 MMFT benchmarks, and `push_captioned`.

datasets 5.2 runs no loading scripts, so the builder is a class you instantiate directly:

```python
builder = CaptionedImages(config_name="dtd", captioner="openai:gemini-2.5-flash-lite", dataset_name="captioned_dtd",
                          captioner_kwargs={"base_url": "https://generativelanguage.googleapis.com/v1beta/openai/"})
builder.download_and_prepare()      # captions every split (through the caption cache), then writes Arrow files
dataset = builder.as_dataset()      # DatasetDict: image, label (ClassLabel), captions (List(string))
```
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field

import datasets

from .cache import identity_json
from .caption import caption_dataset
from .prompts import CAPTION_TYPES, DEFAULT_WORDS, DOMAINS, PROMPT_TEMPLATE, build_prompt, normalize_class_name
from .provenance import (
    SOURCES_COLUMN,
    VOLATILE_PROVENANCE_KEYS,
    CaptionSettings,
    attach_provenance,
    caption_counts,
    caption_provenance,
    captions_per_row,
    differing_settings,
    make_provenance,
    provenance_captioners,
    provenance_feature,
)
from .stats import caption_stats

CARD_TEMPLATE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "templates", "dataset_card.md"
)


@dataclass(frozen=True)
class DatasetPreset:
    """Where a benchmark lives on the Hub and how to read it.

    The Hub ids are suggestions of Parquet (script-free) copies; they are not fetched in tests. Check each one's
    licence and split layout before use.
    """

    source: str
    splits: tuple[str, ...]
    domain: str
    label_column: str = "label"
    image_column: str = "image"
    notes: str = ""


PRESETS: dict[str, DatasetPreset] = {
    "oxford_pets": DatasetPreset(
        "timm/oxford-iiit-pet",
        ("train", "test"),
        DOMAINS["oxford_pets"],
        notes="37 breeds; train is the official trainval split.",
    ),
    "flowers102": DatasetPreset(
        "nelorth/oxford-flowers",
        ("train", "test"),
        DOMAINS["flowers102"],
        notes="102 species; check that the names are species, not ids.",
    ),
    "dtd": DatasetPreset("tanganke/dtd", ("train", "test"), DOMAINS["dtd"], notes="47 texture words."),
    "gtsrb": DatasetPreset(
        "tanganke/gtsrb",
        ("train", "test"),
        DOMAINS["gtsrb"],
        notes="43 classes; use CLIP's descriptive names (e.g. 'red and white circle 20 kph speed "
        "limit') via class_names if the source has ids.",
    ),
    "stanford_cars": DatasetPreset(
        "tanganke/stanford_cars", ("train", "test"), DOMAINS["stanford_cars"], notes="196 make/model/year names."
    ),
    "fgvc_aircraft": DatasetPreset(
        "HuggingFaceM4/FGVC-Aircraft",
        ("train", "validation", "test"),
        DOMAINS["fgvc_aircraft"],
        label_column="variant",
        notes="100 variants.",
    ),
    "cub200": DatasetPreset(
        "bentrevett/caltech-ucsd-birds-200-2011",
        ("train", "test"),
        DOMAINS["cub200"],
        notes="200 species; names like '001.Black_footed_Albatross' are normalised.",
    ),
    "cifar10": DatasetPreset("uoft-cs/cifar10", ("train", "test"), DOMAINS["cifar10"], image_column="img"),
    "cifar100": DatasetPreset(
        "uoft-cs/cifar100", ("train", "test"), DOMAINS["cifar100"], image_column="img", label_column="fine_label"
    ),
    "imagenet": DatasetPreset(
        "ILSVRC/imagenet-1k",
        ("train", "validation"),
        DOMAINS["imagenet"],
        notes="Gated. Use the cleaned CLIP-style class names via class_names.",
    ),
    "caltech101": DatasetPreset(
        "dpdl-benchmark/caltech101", ("train", "test"), DOMAINS["caltech101"], notes="CoOp drops the background class."
    ),
    "eurosat": DatasetPreset(
        "tanganke/eurosat",
        ("train", "test"),
        DOMAINS["eurosat"],
        notes="10 land-cover classes; CoOp uses descriptive names ('annual crop land').",
    ),
    "food101": DatasetPreset(
        "ethz/food101",
        ("train", "validation"),
        DOMAINS["food101"],
        notes="101 dishes; 'validation' is the official test split.",
    ),
}


def make_captioner(spec: str, **kwargs):
    """Builds a captioner from `"openai:MODEL"`, `"openai-batch:MODEL"` (the provider's Batch API) or
    `"transformers:MODEL_OR_PATH"`, plus backend keyword arguments."""
    backend, _, model = spec.partition(":")
    if not model:
        raise ValueError(
            f"Captioner spec {spec!r} must look like 'openai:MODEL', 'openai-batch:MODEL' or "
            "'transformers:MODEL_OR_PATH'."
        )
    if backend == "openai-batch":
        from .captioners.openai_batch import OpenAIBatchCaptioner

        return OpenAIBatchCaptioner(model=model, **kwargs)
    if backend == "openai":
        from .captioners.openai_compatible import OpenAICompatibleCaptioner

        return OpenAICompatibleCaptioner(model=model, **kwargs)
    if backend == "transformers":
        from .captioners.transformers_vlm import TransformersCaptioner

        return TransformersCaptioner(model, **kwargs)
    raise ValueError(
        f"Unknown captioner backend {backend!r} in {spec!r}; use 'openai', 'openai-batch' or 'transformers'."
    )


@dataclass
class CaptionedImagesConfig(datasets.BuilderConfig):
    """Config of `CaptionedImages`; its fields can be passed as keyword arguments to the builder.

    Args:
        source (`str`, *optional*): a Hub id or local directory for `load_dataset`, or (given to the builder, not
            the config) an in-memory `Dataset`/`DatasetDict`, then identified by `source_fingerprint`.
        source_config (`str`, *optional*): the source's config name.
        splits (`tuple[str, ...]`, *optional*): the splits to caption; all by default.
        captioner (`str` or `tuple`, *optional*): `"openai:MODEL"` / `"transformers:PATH"`; several captioners as a
            tuple of specs, each a spec string or a dict `{"spec": "openai:MODEL", **its own make_captioner keyword
            arguments}` (given as JSON text in the config); or (given to the builder) a captioner object or a list of
            them, then identified by `captioner_identity`. Several captioners add a `caption_sources` column (see
            `caption_dataset`).
        captioner_kwargs (`dict`): keyword arguments for `make_captioner`, for every spec (a spec's own win).
        domain (`str`, *optional*): the prompt's domain word (presets set it).
        caption_types, captions_per_type, words, prompt_template, max_passes, strict, allow_missing,
            one_request_per_image: see `caption_dataset`.
        image_column, label_column (`str`): columns of the source; the output always uses `image` and `label`.
        class_names (`tuple[str, ...]`, *optional*): names overriding the source's `ClassLabel` names.
        caption_cache_dir (`str`, *optional*): the caption cache (see `caption_dataset`).
    """

    source: str | None = None
    source_config: str | None = None
    source_fingerprint: str | None = None
    splits: tuple[str, ...] | None = None
    captioner: str | tuple | None = None
    captioner_kwargs: dict = field(default_factory=dict)
    captioner_identity: str | None = None
    domain: str | None = None
    caption_types: tuple[str, ...] = CAPTION_TYPES
    captions_per_type: int = 1
    words: int = DEFAULT_WORDS
    prompt_template: str = PROMPT_TEMPLATE
    image_column: str = "image"
    label_column: str = "label"
    class_names: tuple[str, ...] | None = None
    caption_cache_dir: str | None = None
    max_passes: int = 3
    strict: bool = False
    allow_missing: bool = False
    one_request_per_image: bool = False


def _preset_config(name: str, preset: DatasetPreset) -> CaptionedImagesConfig:
    return CaptionedImagesConfig(
        name=name,
        version=datasets.Version("1.0.0"),
        description=preset.notes,
        source=preset.source,
        splits=preset.splits,
        domain=preset.domain,
        image_column=preset.image_column,
        label_column=preset.label_column,
    )


class CaptionedImages(datasets.GeneratorBasedBuilder):
    """Captions a labelled image dataset and prepares `image`, `label` (`ClassLabel`), `captions` (`List(string)`).

    Instantiate it directly (pass `dataset_name=`; no loading script): `CaptionedImages(config_name="dtd",
    captioner=..., dataset_name="captioned_dtd")` or `CaptionedImages(source=my_dataset_dict, domain="pets",
    captioner=my_captioner, dataset_name="captioned_pets")`; `captioner=[a, b]` (objects or specs) captions with each
    and adds `caption_sources`. Every caption goes through the caption cache, and a
    prepared builder is reused by `download_and_prepare` without captioning again.
    """

    BUILDER_CONFIG_CLASS = CaptionedImagesConfig
    BUILDER_CONFIGS = [CaptionedImagesConfig(name="default", version=datasets.Version("1.0.0"))] + [
        _preset_config(name, preset) for name, preset in PRESETS.items()
    ]
    DEFAULT_CONFIG_NAME = "default"

    def __init__(self, *args, source=None, captioner=None, **kwargs):
        self._source_object = self._captioner_object = None
        if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
            self._source_object = source
            parts = source.values() if isinstance(source, datasets.DatasetDict) else [source]
            kwargs["source_fingerprint"] = ",".join(part._fingerprint for part in parts)
        elif source is not None:
            kwargs["source"] = source
        items = (
            list(captioner) if isinstance(captioner, (list, tuple)) else [captioner] if captioner is not None else []
        )
        specs = [item for item in items if isinstance(item, (str, dict))]
        if specs and len(specs) < len(items):
            raise ValueError("captioner: pass captioner objects or specs ('openai:MODEL', {'spec': ...}), not both.")
        if items and not specs:
            self._captioner_object = items if len(items) > 1 else items[0]
            identities = [item.cache_identity() for item in items]
            kwargs["captioner_identity"] = identity_json(identities if len(items) > 1 else identities[0])
        elif len(specs) > 1:  # hashable config: dict specs as JSON text
            kwargs["captioner"] = tuple(
                spec if isinstance(spec, str) else json.dumps(spec, sort_keys=True) for spec in specs
            )
        elif specs:
            kwargs["captioner"] = specs[0]
        for key in ("splits", "caption_types", "class_names"):  # hashable, stable config ids
            if kwargs.get(key) is not None and not isinstance(kwargs[key], str):
                kwargs[key] = tuple(kwargs[key])
        self._loaded_source = self._names = None
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ source
    def _source(self) -> datasets.DatasetDict:
        if self._loaded_source is None:
            config = self.config
            source = self._source_object
            if source is None:
                if not config.source:
                    raise ValueError("CaptionedImages needs a source: source='org/name', a local dir or a Dataset.")
                source = datasets.load_dataset(config.source, config.source_config)
            if isinstance(source, datasets.Dataset):
                source = datasets.DatasetDict({str(source.split or "train"): source})
            splits = list(config.splits) if config.splits else list(source)
            missing = [split for split in splits if split not in source]
            if missing:
                raise ValueError(f"Split(s) {missing} not in the source; it has {list(source)}.")
            for split in splits:
                for column in (config.image_column, config.label_column):
                    if column not in source[split].column_names:
                        raise ValueError(
                            f"Column {column!r} not in split {split!r} (columns {source[split].column_names}); set "
                            "image_column=/label_column=."
                        )
            self._loaded_source = datasets.DatasetDict({split: source[split] for split in splits})
        return self._loaded_source

    def _class_names(self) -> list[str]:
        if self._names is None:
            config, source = self.config, self._source()
            feature = next(iter(source.values())).features[config.label_column]
            if config.class_names:
                self._names = list(config.class_names)
            elif isinstance(feature, datasets.ClassLabel):
                self._names = list(feature.names)
            else:  # string labels: one ClassLabel over all splits, sorted for a stable id order
                values = {str(value) for part in source.values() for value in part.unique(config.label_column)}
                self._names = sorted(values)
        return self._names

    def _captioner(self):
        if self._captioner_object is None:
            if not self.config.captioner:
                raise ValueError(
                    "CaptionedImages needs a captioner: 'openai:MODEL', 'transformers:PATH' or an object."
                )
            specs = self._specs()
            captioners = [make_captioner(spec, **{**self.config.captioner_kwargs, **own}) for spec, own in specs]
            self._captioner_object = captioners if len(captioners) > 1 else captioners[0]
        return self._captioner_object

    def _specs(self) -> list[tuple[str, dict]]:
        """`(spec, its own make_captioner keyword arguments)` of each captioner the config names."""
        specs = []
        for item in (self.config.captioner,) if isinstance(self.config.captioner, str) else self.config.captioner:
            own = json.loads(item) if item.lstrip().startswith("{") else {"spec": item}
            if not isinstance(own, dict) or not isinstance(own.get("spec"), str):
                raise ValueError(f"Captioner spec {item!r} must be 'openai:MODEL' or a dict with a 'spec' string.")
            specs.append((own.pop("spec"), own))
        return specs

    def _identities(self) -> list[dict]:
        """The identity of every captioner, once it is built (the captioner order of the captions)."""
        captioner = self._captioner()
        return [item.cache_identity() for item in (captioner if isinstance(captioner, list) else [captioner])]

    def _features(self, captioner_identity: dict | list) -> datasets.Features:
        """The output features, with the provenance (settings and `captioner_identity`, a list of identities for several
        captioners, which add `caption_sources`) in the caption feature."""
        config = self.config
        settings = CaptionSettings(
            domain=config.domain,
            caption_types=tuple(config.caption_types),
            captions_per_type=config.captions_per_type,
            words=config.words,
            prompt_template=config.prompt_template,
            class_names=tuple(config.class_names) if config.class_names else None,
            extra={"source": config.source or f"in-memory dataset {config.source_fingerprint}"},
        )
        provenance = make_provenance(captioner_identity, settings, None, None)
        features = {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=self._class_names()),
            "captions": provenance_feature(provenance),
        }
        if isinstance(captioner_identity, list):
            features[SOURCES_COLUMN] = datasets.List(datasets.Value("string"))
        return datasets.Features(features)

    # ------------------------------------------------------------------ builder API
    def _info(self) -> datasets.DatasetInfo:
        config = self.config
        if not config.domain:
            raise ValueError("CaptionedImages needs domain= (the prompt's domain word), or a preset config_name.")
        if config.captioner_identity:
            identity = json.loads(config.captioner_identity)
        else:  # the captioner is built only to caption (it may load a model): `_split_generators` records its identity
            identity = [{"spec": spec, "kwargs": {**config.captioner_kwargs, **own}} for spec, own in self._specs()]
            identity = identity if len(identity) > 1 else identity[0]
        return datasets.DatasetInfo(
            description=f"Images with synthetic MMFT captions made by mmft-hf from {config.source or 'a dataset'}.",
            features=self._features(identity),
        )

    def _split_generators(self, dl_manager):
        # preparing: build the captioner now and record its real identity instead of the spec
        identities = self._identities()
        self.info.features = self._features(identities if len(identities) > 1 else identities[0])
        return [datasets.SplitGenerator(name=split, gen_kwargs={"split": split}) for split in self._source()]

    def _generate_examples(self, split: str):
        config = self.config
        part = self._source()[split]
        captioned = caption_dataset(
            part,
            self._captioner(),
            domain=config.domain,
            caption_types=config.caption_types,
            captions_per_type=config.captions_per_type,
            image_column=config.image_column,
            label_column=config.label_column,
            class_names=config.class_names,
            prompt_template=config.prompt_template,
            words=config.words,
            cache_dir=config.caption_cache_dir,
            strict=config.strict,
            allow_missing=config.allow_missing,
            max_passes=config.max_passes,
            one_request_per_image=config.one_request_per_image,
        )
        label_ids = None  # string labels: their ids in the ClassLabel of `_class_names`
        if not isinstance(part.features[config.label_column], datasets.ClassLabel) and not config.class_names:
            label_ids = {name: index for index, name in enumerate(self._class_names())}
        extra = [SOURCES_COLUMN] if SOURCES_COLUMN in captioned.column_names else []
        rows = captioned.select_columns([config.image_column, config.label_column, "captions", *extra])
        rows = rows.cast_column(config.image_column, datasets.Image(decode=False))  # keep the original bytes
        for index, row in enumerate(rows):
            label = row[config.label_column]
            if label_ids is not None:
                label = label_ids[str(label)]
            example = {"image": row[config.image_column], "label": label, "captions": row["captions"]}
            yield index, {**example, **{column: row[column] for column in extra}}


# ---------------------------------------------------------------------- publishing


def _is_local_target(target: str) -> bool:
    """A path (absolute, `./`, `../`, `~`, or existing) is a local directory; `org/name` is a Hub repo."""
    return os.path.isabs(target) or target.startswith((".", "~")) or os.path.exists(target) or target.count("/") != 1


def push_captioned(
    dataset_dict: datasets.DatasetDict | datasets.Dataset,
    repo_id_or_local_dir: str,
    *,
    source: str | None = None,
    pretty_name: str | None = None,
    license: str | None = None,
    tokenizer=None,
    caption_column: str = "captions",
    max_shard_size: int = 500 * 2**20,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload captioned dataset with mmft-hf",
) -> str:
    """Writes a captioned dataset in the Hub layout, with a dataset card, to a local directory or a Hub repo.

    The layout is what `push_to_hub` writes and plain `load_dataset(dir_or_repo)` reads: `data/{split}-00000-of-
    0000N.parquet` with the image bytes embedded (`datasets.table.embed_table_storage`, as `push_to_hub` does;
    `to_parquet` alone would keep only file paths), and a `README.md` with YAML `configs` and `dataset_info` plus a
    card rendered from `mmft_hf/templates/dataset_card.md` (source, captioner, prompt, counts, caption statistics,
    licence reminder). A split without a caption column (e.g. an uncaptioned test split) gets empty caption lists.

    Args:
        dataset_dict (`DatasetDict` or `Dataset`): captioned splits (a `Dataset` is pushed as `train`).
        repo_id_or_local_dir (`str`): `"org/name"` pushes to the Hub (dataset repo, created if needed); a path
            (absolute, `./...`, `~...` or existing) writes there.
        source (`str`, *optional*): the source dataset named in the card (defaults to the provenance's).
        pretty_name (`str`, *optional*): the card title.
        license (`str`, *optional*): the licence id for the card metadata (must suit the source data).
        tokenizer (*optional*): a CLIP tokenizer, to add token lengths and the >77-token share to the card.
        caption_column (`str`, defaults to `"captions"`): the caption column.
        max_shard_size (`int`, defaults to 500 MiB): Parquet shard size.
        private (`bool`, *optional*), token (`str`, *optional*), commit_message (`str`): Hub options.

    Returns:
        `str`: the local directory, or the Hub repo URL.
    """
    if isinstance(dataset_dict, datasets.Dataset):
        dataset_dict = datasets.DatasetDict({"train": dataset_dict})
    provenances = {s: caption_provenance(d, caption_column) for s, d in dataset_dict.items()}
    captioned = {s: p for s, p in provenances.items() if p is not None}
    if not captioned:
        raise ValueError(f"No split has caption provenance in column {caption_column!r}; caption it first.")
    first_split, base = next(iter(captioned.items()))
    for split, provenance in captioned.items():
        differing = differing_settings(base, provenance, ignore=(*VOLATILE_PROVENANCE_KEYS, "source"))
        if differing:
            raise ValueError(f"Split {split!r} was captioned with other settings than {first_split!r}: {differing}.")
    per_row = captions_per_row(base)
    counts = {}
    splits = {}
    for split, part in dataset_dict.items():
        if caption_column not in part.column_names:
            part = part.add_column(caption_column, [[]] * len(part), feature=datasets.List(datasets.Value("string")))
        if "caption_sources" in base and SOURCES_COLUMN not in part.column_names:  # several captioners
            part = part.add_column(SOURCES_COLUMN, [[]] * len(part), feature=datasets.List(datasets.Value("string")))
        counts[split] = caption_counts([list(row) for row in part[caption_column]], per_row)
        if split not in captioned:  # nothing was asked for
            counts[split]["captions_expected"] = 0
        splits[split] = part
    provenance = {**base, "shard": None, "counts": counts, "source": source or base.get("source")}
    # one provenance (hence identical features) for every split: one config, one schema
    splits = {split: attach_provenance(part, provenance, caption_column) for split, part in splits.items()}
    features = next(iter(splits.values())).features
    for split, part in splits.items():
        if part.features != features:
            raise ValueError(f"Split {split!r} has features {part.features}, unlike the others: {features}.")

    layout = dict(
        splits=splits,
        features=features,
        provenance=provenance,
        caption_column=caption_column,
        tokenizer=tokenizer,
        target=repo_id_or_local_dir,
        pretty_name=pretty_name,
        license=license,
        max_shard_size=max_shard_size,
    )
    if _is_local_target(repo_id_or_local_dir):
        out_dir = os.path.expanduser(repo_id_or_local_dir)
        _write_hub_layout(out_dir, **layout)
        return out_dir
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="mmft-push-") as out_dir:
        _write_hub_layout(out_dir, **layout)
        url = api.create_repo(repo_id_or_local_dir, repo_type="dataset", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id_or_local_dir, folder_path=out_dir, repo_type="dataset", commit_message=commit_message
        )
    return str(url)


def _write_hub_layout(
    out_dir, *, splits, features, provenance, caption_column, tokenizer, target, pretty_name, license, max_shard_size
):
    """Writes the Parquet shards (images embedded) and the dataset card of `push_captioned` into `out_dir`."""
    from datasets.info import DatasetInfosDict
    from datasets.table import embed_table_storage
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCardData

    os.makedirs(os.path.join(out_dir, "data"), exist_ok=True)
    info = datasets.DatasetInfo(config_name="default", features=features, splits=datasets.SplitDict())
    info.download_size = info.dataset_size = 0
    for split, part in splits.items():
        try:  # what push_to_hub uses to size shards (file-backed images counted by file size)
            num_bytes = part._estimate_nbytes()
        except Exception:
            num_bytes = part.data.nbytes
        num_shards = max(1, math.ceil(num_bytes / max_shard_size))
        for index in range(num_shards):
            shard = part.shard(num_shards, index, contiguous=True).with_format("arrow")
            shard = shard.map(embed_table_storage, batched=True, batch_size=100, desc="Embedding images")
            path = os.path.join(out_dir, "data", f"{split}-{index:05d}-of-{num_shards:05d}.parquet")
            shard.with_format(None).to_parquet(path)
            info.download_size += os.path.getsize(path)
        info.splits.add(datasets.SplitInfo(name=split, num_bytes=num_bytes, num_examples=len(part)))
        info.dataset_size += num_bytes
    card_data = DatasetCardData(
        license=license,
        pretty_name=pretty_name,
        task_categories=["zero-shot-image-classification", "image-classification"],
        tags=["mmft", "synthetic-captions", "clip", "image-text"],
    )
    DatasetInfosDict({"default": info}).to_dataset_card_data(card_data)
    MetadataConfigs(
        {"default": {"data_files": [{"split": split, "path": f"data/{split}-*"} for split in splits]}}
    ).to_dataset_card_data(card_data)
    _render_card(card_data, splits, provenance, caption_column, tokenizer, target, pretty_name, license).save(
        os.path.join(out_dir, "README.md")
    )


def _render_card(card_data, splits, provenance, caption_column, tokenizer, target, pretty_name, license):
    from huggingface_hub import DatasetCard

    stats = {}
    for split, part in splits.items():
        if provenance["counts"][split]["captions"]:
            report = caption_stats(part, tokenizer, caption_column=caption_column)
            stats[split] = {k: v for k, v in report.items() if isinstance(v, dict) and v.get("captions")}
    names = next(iter(splits.values())).features.get("label")
    example_class = normalize_class_name(names.names[0]) if isinstance(names, datasets.ClassLabel) else "cat"
    identities = provenance_captioners(provenance)
    models = [identity.get("model") or identity.get("spec") or "the captioning model" for identity in identities]
    return DatasetCard.from_template(
        card_data,
        template_path=CARD_TEMPLATE,
        pretty_name=pretty_name or f"Captioned {provenance.get('source') or 'images'}",
        repo_id=target,
        source=provenance.get("source") or "an image classification dataset",
        captioners=[
            (source, json.dumps(identity, sort_keys=True))
            for source, identity in zip(provenance.get("caption_sources") or [None], identities, strict=True)
        ],
        captioner_model=", ".join(dict.fromkeys(models)),
        domain=provenance["domain"],
        caption_types=provenance["caption_types"],
        captions_per_type=provenance["captions_per_type"],
        prompt_template=provenance["prompt_template"],
        example_prompt=build_prompt(
            example_class,
            provenance["domain"],
            provenance["caption_types"][0],
            provenance["words"],
            provenance["prompt_template"],
        ),
        counts=provenance["counts"],
        caption_stats=stats,
        has_tokens=tokenizer is not None,
        max_length=77,
        license=license,
        provenance_json=json.dumps(provenance, indent=2, sort_keys=True, ensure_ascii=False),
    )
