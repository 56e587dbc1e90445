"""Batch assembly for MMFT: one random caption (or sentence) per sample, the class template, 77-token truncation,
augmentation.

`MMFTDataCollator` turns rows of a captioned `datasets.Dataset` (image, label, captions) into the tensors a
CLIP-style model and the MMFT loss need: `pixel_values`, `input_ids`, `attention_mask` and `labels`.

Where a bad image surfaces. `datasets.Image()` decodes a file when its row is read (`dataset[i]`), so with the
default feature a corrupt file fails inside the DataLoader, before this collator, with PIL's message and no row
number. Two ways to get a message that names the row:

- check once up front: `validate_captioned_dataset(dataset, check_images=True)` lists every bad row;
- or let the collator decode: `dataset.cast_column("image", datasets.Image(decode=False))` hands it the raw
  bytes/path, and a failure raises a `ValueError` naming the row (its `index_column` value when set, e.g. after
  `dataset = dataset.add_column("row_index", range(len(dataset)))`, otherwise its position in the batch), the
  column, the file path when known, and the fix.
"""

from __future__ import annotations

import operator
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import get_worker_info
from transformers.utils import logging

from ..captioning.sentences import CAPTION_SAMPLINGS, caption_units
from ..encoders import max_text_length
from .data import IMAGE_DECODE_ERRORS, describe_image_source, load_image, random_resized_crop, to_rgb

logger = logging.get_logger(__name__)

SAMPLE_KEY_COLUMN = "__mmft_sample__"


class EpochSampler(torch.utils.data.Sampler):
    """Shuffles row indices with a generator seeded by `seed + epoch` and yields `(epoch, index)` sample keys.

    The permutation of an epoch depends on `(seed, epoch)` only (as with accelerate's `SeedableRandomSampler`), so
    every process of a distributed run, and a run resumed mid-epoch, sees the same order. The key travels with the
    index to the worker that reads the row (`EpochKeyedDataset`), which is how the collator knows the epoch even in
    persistent worker processes. `Trainer` calls `set_epoch` before each epoch.

    Args:
        num_rows (`int`): rows in the dataset.
        seed (`int`): the data seed.
    """

    def __init__(self, num_rows: int, seed: int):
        self.num_rows, self.seed, self.epoch = num_rows, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        epoch = self.epoch
        for index in torch.randperm(self.num_rows, generator=generator).tolist():
            yield (epoch, index)


class EpochKeyedDataset(torch.utils.data.Dataset):
    """A `datasets.Dataset` read by `(epoch, index)` sample keys; each row carries its key in `SAMPLE_KEY_COLUMN`.

    Args:
        dataset (`datasets.Dataset`): the rows.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        return {**self.dataset[key[1]], SAMPLE_KEY_COLUMN: tuple(key)}

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[dict]:
        rows = self.dataset.__getitems__([index for _, index in keys])
        return [{**row, SAMPLE_KEY_COLUMN: tuple(key)} for row, key in zip(rows, keys)]


def _crop_size(image_processor) -> tuple[int, int] | tuple[None, None]:
    """(height, width) the processor's output has: `crop_size` for CLIP, `size` for processors without a crop;
    `(None, None)` for SigLIP 2's NaFlex processor (`max_num_patches`), which keeps each image's aspect ratio."""
    if getattr(image_processor, "max_num_patches", None):
        return None, None
    for attribute in ("crop_size", "size"):
        size = getattr(image_processor, attribute, None)
        if size is None:
            continue
        height, width = _get(size, "height"), _get(size, "width")
        if height and width:
            return int(height), int(width)
        if _get(size, "shortest_edge"):
            edge = int(_get(size, "shortest_edge"))
            return edge, edge
    raise ValueError(
        f"Cannot read an output size from {type(image_processor).__name__}: it has neither crop_size nor size with "
        "height/width or shortest_edge."
    )


def _get(size, key):
    try:
        return size[key]
    except (KeyError, TypeError):
        return getattr(size, key, None)


@dataclass
class MMFTDataCollator:
    """Collates rows of a captioned dataset into a CLIP batch for MMFT training and evaluation.

    Text (method.md §3-4): in training each call draws **one caption per row uniformly at random** and prefixes the
    class template, `"a photo of a {class_name}. {caption}"`. A row with an empty caption list gets the template
    alone (`"a photo of a {class_name}."`). With `caption_sampling="sentence"` the drawn caption is split into
    sentences (`mmft_hf.captioning.sentences.split_sentences`) and one of them, drawn uniformly, follows the
    template (DreamLIP's sub-captions: every part of a long caption gets read, none is cut off). With
    `template_probability=p` a row trains on the template alone with probability p (VeCLIP-style mixing of the
    original text with the synthetic one; p=1 gives FLYP's texts). Texts longer than `max_length` tokens are truncated by the tokenizer,
    which keeps the end-of-text token CLIP pools at; `num_texts` and `num_truncated` count them, and the first
    truncation logs one warning.

    Images: converted to RGB (transparency composited on white, as the processor does), then in training a random
    resized crop (`crop_scale`, bicubic) to the processor's crop size, then the processor (resize, centre crop,
    normalise). With `train=False` the processor alone, and the first caption: the output is deterministic.

    Randomness: a row that carries its sample key (`SAMPLE_KEY_COLUMN`, `(epoch, row index)`, which
    `EpochKeyedDataset` adds and `MMFTTrainer` always uses) gets its caption (and sentence) and its crop from two
    generators seeded by `(seed, epoch, row index)` alone, and its template-or-caption draw from a third. The draws are then stateless: the same in any worker process, with
    any number of workers, and in a run resumed from a checkpoint, so a resumed run trains on exactly the texts and
    crops of the uninterrupted one. Rows without a key (the collator used on its own) draw from two `random.Random`
    streams seeded by `seed`; in DataLoader worker processes these are reseeded from `seed` and the worker's torch
    seed, so workers do not repeat each other and epochs do not repeat, but such draws cannot be replayed on
    resume. Counters such as `num_truncated` are per process: with `dataloader_num_workers > 0` they accumulate in
    the workers' copies.

    Args:
        processor (`CLIPProcessor`-like): has `.tokenizer` and `.image_processor`.
        class_names (`list[str]`): class names by label id, used as given (subclass and override `build_text`
            to normalise them).
        class_template (`str` or `None`, defaults to `"a photo of a {}."`): prefix with one `{}` for the class
            name; `None` trains on the caption alone.
        image_column (`str`, defaults to `"image"`): PIL images, paths, or `Image(decode=False)` dicts.
        label_column (`str`, defaults to `"label"`): integer labels in `[0, len(class_names))`.
        caption_column (`str` or `None`, defaults to `"captions"`): lists of captions; `None` trains on the class
            template alone (FLYP-style).
        caption_sampling (`str`, defaults to `"caption"`): `"caption"` draws a whole caption; `"sentence"` draws a
            caption, then one of its sentences (with `train=False`: the first sentence of the first caption).
        template_probability (`float`, defaults to 0.0): in training, the probability that a row's text is the
            class template alone instead of template + caption; needs a `class_template`.
        train (`bool`, defaults to `True`): random caption and random crop; `False` gives deterministic output.
        crop_scale (`tuple[float, float]`, defaults to `(0.9, 1.0)`): area range of the training crop.
        seed (`int`, defaults to 0): seeds the caption and crop draws (with each row's sample key when it has one).
        max_length (`int`, *optional*): token limit; defaults to `mmft_hf.encoders.max_text_length(None, tokenizer)`
            (the tokenizer's limit, at most 77); the trainer passes `max_text_length(model, tokenizer)`.
        index_column (`str`, *optional*): a column identifying rows in error messages (otherwise the batch
            position is given).
        padding (`bool` or `str`, defaults to `True`): `True` pads to the longest text; `"max_length"` to
            `max_length`, as SigLIP needs (`mmft_hf.encoders.text_padding(model)`; the trainer sets it).
    """

    processor: Any
    class_names: list[str]
    class_template: str | None = "a photo of a {}."
    image_column: str = "image"
    label_column: str = "label"
    caption_column: str | None = "captions"
    caption_sampling: str = "caption"
    template_probability: float = 0.0
    train: bool = True
    crop_scale: tuple[float, float] = (0.9, 1.0)
    seed: int = 0
    max_length: int | None = None
    index_column: str | None = None
    padding: bool | str = True
    num_texts: int = field(default=0, init=False)
    num_truncated: int = field(default=0, init=False)
    _warned_truncation: bool = field(default=False, init=False, repr=False)
    _rng_key: Any = field(default=None, init=False, repr=False)
    _caption_rng: random.Random | None = field(default=None, init=False, repr=False)
    _crop_rng: random.Random | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if isinstance(self.class_names, str) or not isinstance(self.class_names, Sequence) or not self.class_names:
            raise ValueError(f"class_names must be a non-empty list of strings, got {self.class_names!r:.100}.")
        self.class_names = list(self.class_names)
        if self.class_template is not None:
            if self.class_template.count("{}") != 1:
                raise ValueError(
                    f"class_template must contain exactly one '{{}}' for the class name, got {self.class_template!r}."
                )
            try:  # fail early on other braces, e.g. "{name}"
                self.class_template.format("x")
            except (IndexError, KeyError, ValueError) as error:
                raise ValueError(
                    f"class_template {self.class_template!r} cannot be formatted ({error!r}); escape literal "
                    "braces as '{{' and '}}'."
                ) from error
        if self.class_template is None and self.caption_column is None:
            raise ValueError("class_template and caption_column are both None: there would be no text to train on.")
        if self.caption_sampling not in CAPTION_SAMPLINGS:
            raise ValueError(f"caption_sampling must be one of {CAPTION_SAMPLINGS}, got {self.caption_sampling!r}.")
        if not 0.0 <= self.template_probability <= 1.0:
            raise ValueError(f"template_probability must be in [0, 1], got {self.template_probability!r}.")
        if self.template_probability > 0 and self.class_template is None:
            raise ValueError(
                f"template_probability={self.template_probability} trains some rows on the class template alone, but "
                "class_template is None. Set a class_template, or template_probability=0."
            )
        tokenizer = self.processor.tokenizer
        if self.max_length is None:  # the trainer passes the model's limit: max_text_length(model, tokenizer)
            self.max_length = max_text_length(None, tokenizer)
        if self.max_length < 2:
            raise ValueError(f"max_length must leave room for the start and end tokens, got {self.max_length}.")
        self.crop_height, self.crop_width = _crop_size(self.processor.image_processor)

    # ------------------------------------------------------------------------------------------------- text
    def build_text(self, class_name: str, caption: str | None) -> str:
        """The training text of one row; override to normalise class names or change the format.

        Args:
            class_name (`str`): the row's class name, as given in `class_names`.
            caption (`str` or `None`): the drawn caption, `None` when the row has none.
        """
        if self.class_template is None:
            return caption
        prefix = self.class_template.format(class_name)
        return prefix if caption is None else f"{prefix} {caption}"

    def _generators(self, row: dict) -> tuple[random.Random, random.Random]:
        """The caption and crop generators of one row: from its sample key, else the collator's streams."""
        key = row.get(SAMPLE_KEY_COLUMN)
        if key is not None:
            epoch, index = key
            # String seeds are hashed with SHA-512 by `random`: reproducible across runs, processes and workers.
            return (
                random.Random(f"mmft-captions:{self.seed}:{epoch}:{index}"),
                random.Random(f"mmft-crops:{self.seed}:{epoch}:{index}"),
            )
        return self._streams()

    def _template_drawn(self, row: dict, caption_rng: random.Random) -> bool:
        """Whether this row's text is the class template alone (probability `template_probability`), drawn from a
        generator of its own keyed like the others, so that `template_probability=0` leaves the caption draws as
        they were."""
        if not self.train or self.template_probability == 0:
            return False
        key = row.get(SAMPLE_KEY_COLUMN)
        rng = caption_rng if key is None else random.Random(f"mmft-template:{self.seed}:{key[0]}:{key[1]}")
        return rng.random() < self.template_probability

    def _streams(self) -> tuple[random.Random, random.Random]:
        worker = get_worker_info()
        key = None if worker is None else (worker.id, worker.seed)
        if self._caption_rng is None or key != self._rng_key:
            # String seeds are hashed with SHA-512 by `random`: reproducible across runs and processes.
            base = f"{self.seed}" if worker is None else f"{self.seed}:worker-seed-{worker.seed}"
            self._caption_rng = random.Random(f"mmft-captions:{base}")
            self._crop_rng = random.Random(f"mmft-crops:{base}")
            self._rng_key = key
        return self._caption_rng, self._crop_rng

    def _row_name(self, row: dict, position: int) -> str:
        if self.index_column is not None and self.index_column in row:
            if self.index_column.startswith("__"):  # an internal row-index column: its name tells the user nothing
                return f"Row {row[self.index_column]!r}"
            return f"Row {row[self.index_column]!r} ({self.index_column!r})"
        return f"Row at batch position {position}"

    def _missing(self, row: dict, position: int, column: str, argument: str) -> ValueError:
        return ValueError(
            f"{self._row_name(row, position)} has no column {column!r}; it has "
            f"{sorted(name for name in row if not name.startswith('__'))}. Pass the right name "
            f"with `{argument}=`; with transformers.Trainer also set `remove_unused_columns=False`, or the Trainer "
            "drops the columns the model does not take."
        )

    def _text(self, row: dict, position: int, label: int, caption_rng: random.Random) -> str:
        caption = None
        if self.caption_column is not None:
            if self.caption_column not in row:
                raise self._missing(row, position, self.caption_column, "caption_column")
            captions = row[self.caption_column]
            if captions is None or isinstance(captions, str) or not isinstance(captions, Sequence):
                raise ValueError(
                    f"{self._row_name(row, position)}: {self.caption_column!r} is {type(captions).__name__}, not a "
                    "list of strings. Use [] for no caption and [text] for one; `validate_captioned_dataset` checks "
                    "every row."
                )
            if self._template_drawn(row, caption_rng):
                return self.build_text(self.class_names[label], None)
            if len(captions):
                index = caption_rng.randrange(len(captions)) if self.train else 0
                caption = captions[index]
                if not isinstance(caption, str):
                    raise ValueError(
                        f"{self._row_name(row, position)}: {self.caption_column!r}[{index}] is "
                        f"{type(caption).__name__} {caption!r:.80}, not a string."
                    )
                if self.caption_sampling == "sentence":
                    sentences = caption_units(caption, "sentence")
                    if not sentences and self.class_template is None:
                        raise ValueError(
                            f"{self._row_name(row, position)}: {self.caption_column!r}[{index}] {caption!r:.80} has "
                            "no sentence and class_template is None, so it has no text. Fix the caption."
                        )
                    caption = None
                    if sentences:
                        caption = sentences[caption_rng.randrange(len(sentences)) if self.train else 0]
            elif self.class_template is None:
                raise ValueError(
                    f"{self._row_name(row, position)} has an empty {self.caption_column!r} list and class_template "
                    "is None, so it has no text. Set a class_template (empty lists then use it alone) or caption "
                    "the row."
                )
        return self.build_text(self.class_names[label], caption)

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        tokenizer = self.processor.tokenizer
        # One tokenisation without truncation measures the lengths; over-long ids are then cut here, keeping the
        # last (end-of-text) token as tokenizers' own truncation does. verbose=False: no "longer than" warning.
        ids = tokenizer(texts, verbose=False)["input_ids"]
        lengths = [len(row) for row in ids]
        truncated = sum(length > self.max_length for length in lengths)
        self.num_texts += len(texts)
        self.num_truncated += truncated
        if truncated and not self._warned_truncation:
            self._warned_truncation = True
            logger.warning(
                f"{truncated} of {len(texts)} texts in this batch ({truncated / len(texts):.1%}) exceed "
                f"max_length={self.max_length} tokens (longest: {max(lengths)}) and were truncated; the end-of-text "
                "token is kept, but the tail of the caption is lost. Train on one sentence at a time "
                "(caption_sampling='sentence'), ask the captioner for fewer words, or shorten the class template. "
                "Running totals: `collator.num_truncated` / `collator.num_texts`. This warning is shown once."
            )
        ids = [row if len(row) <= self.max_length else row[: self.max_length - 1] + row[-1:] for row in ids]
        max_length = self.max_length if self.padding == "max_length" else None  # else the tokenizer warns per call
        encoding = tokenizer.pad({"input_ids": ids}, padding=self.padding, max_length=max_length, return_tensors="pt")
        return {"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"]}

    # ----------------------------------------------------------------------------------------------- images
    def _image(self, row: dict, position: int, crop_rng: random.Random):
        value = row[self.image_column]
        try:
            image = to_rgb(load_image(value))
            if self.train:  # NaFlex processors have no output size: the crop keeps the image's own size
                size = (self.crop_height or image.height, self.crop_width or image.width)
                image = random_resized_crop(image, size, scale=self.crop_scale, rng=crop_rng)
        except IMAGE_DECODE_ERRORS as error:
            raise ValueError(
                f"{self._row_name(row, position)}: the image in column {self.image_column!r}"
                f"{describe_image_source(value)} cannot be read ({type(error).__name__}: {error}). Find every bad "
                "row with `validate_captioned_dataset(dataset, check_images=True)`, then replace the file or "
                "remove the row."
            ) from error
        return image

    # ---------------------------------------------------------------------------------------------- collate
    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Collates `rows` (dicts from a `datasets.Dataset`) into `pixel_values`, `input_ids`, `attention_mask`
        and `labels` tensors."""
        if not rows:
            raise ValueError("Cannot collate an empty batch.")
        labels, texts, images = [], [], []
        for position, row in enumerate(rows):
            caption_rng, crop_rng = self._generators(row)
            for column, argument in ((self.image_column, "image_column"), (self.label_column, "label_column")):
                if column not in row:
                    raise self._missing(row, position, column, argument)
            raw_label = row[self.label_column]
            try:  # plain, numpy and 0-d tensor integers; bools, floats and strings are refused
                label = None if isinstance(raw_label, bool) else operator.index(raw_label)
            except TypeError:
                label = None
            if label is None or not 0 <= label < len(self.class_names):
                raise ValueError(
                    f"{self._row_name(row, position)}: {self.label_column!r} is {raw_label!r}, not a label id in "
                    f"[0, {len(self.class_names) - 1}] for the {len(self.class_names)} class_names."
                )
            labels.append(label)
            texts.append(self._text(row, position, label, caption_rng))
            images.append(self._image(row, position, crop_rng))
        image_processor = self.processor.image_processor
        image_inputs = image_processor(images=images, return_tensors="pt")
        names = getattr(image_processor, "model_input_names", None) or ["pixel_values"]
        return {  # SigLIP 2 also needs pixel_attention_mask and spatial_shapes
            **{name: image_inputs[name] for name in names if name in image_inputs},
            **self._tokenize(texts),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
