"""Dataset helpers for training: image conversion and augmentation, few-shot sampling, the validation split, checks.

Everything here works on plain `datasets.Dataset` objects with an image column, an integer (`ClassLabel`) label
column and a `List(string)` captions column, the layout `caption_dataset` produces. Nothing is dropped silently:
problems raise a `ValueError` that names the row, the column and the fix.
"""

from __future__ import annotations

import math
import random
import types
from collections.abc import Sequence

import datasets
import numpy as np
from PIL import Image
from transformers.utils import logging

from ..images import IMAGE_DECODE_ERRORS, describe_image_source, load_image, to_rgb  # noqa: F401  (re-exported)

logger = logging.get_logger(__name__)

_MAX_ROWS_IN_MESSAGE = 10


# --------------------------------------------------------------------------------------------------------- images
def random_resized_crop(
    image: Image.Image,
    size: int | tuple[int, int],
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    rng: random.Random | types.ModuleType = random,
) -> Image.Image:
    """Crops a random area and aspect ratio of `image` and resizes it (bicubic) to `size`.

    The same sampling as torchvision's `RandomResizedCrop` (which the MMFT reference uses for training), without
    torchvision: up to 10 tries of an area fraction drawn uniformly from `scale` and an aspect ratio drawn
    log-uniformly from `ratio`; when no try fits inside the image, a centre crop whose aspect ratio is clamped to
    `ratio`.

    Args:
        image (`PIL.Image.Image`): the image to crop (any mode PIL can resize; call `to_rgb` first for RGB).
        size (`int` or `tuple[int, int]`): output size; an `int` gives a square, a tuple is `(height, width)`.
        scale (`tuple[float, float]`, defaults to `(0.9, 1.0)`): range of the cropped area as a fraction of the
            image area (MMFT's default).
        ratio (`tuple[float, float]`, defaults to `(3/4, 4/3)`): range of the crop's width / height.
        rng (`random.Random`, defaults to the `random` module): source of randomness; pass a seeded
            `random.Random` for reproducible crops.

    Returns:
        `PIL.Image.Image`: the crop, resized to `size`.
    """
    height_out, width_out = (size, size) if isinstance(size, int) else size
    if height_out < 1 or width_out < 1:
        raise ValueError(f"size must be positive, got {size!r}.")
    if not 0 < scale[0] <= scale[1]:
        raise ValueError(f"scale must satisfy 0 < scale[0] <= scale[1], got {scale!r}.")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must satisfy 0 < ratio[0] <= ratio[1], got {ratio!r}.")
    width, height = image.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = rng.randint(0, height - crop_height)
            left = rng.randint(0, width - crop_width)
            break
    else:
        # No try fitted (e.g. a very elongated image): centre crop with the aspect ratio clamped to `ratio`.
        image_ratio = width / height
        if image_ratio < ratio[0]:
            crop_width, crop_height = width, round(width / ratio[0])
        elif image_ratio > ratio[1]:
            crop_width, crop_height = round(height * ratio[1]), height
        else:
            crop_width, crop_height = width, height
        top, left = (height - crop_height) // 2, (width - crop_width) // 2
    # `box` crops and resizes in one resampling pass, the same pixels as crop() followed by resize().
    box = (left, top, left + crop_width, top + crop_height)
    return image.resize((width_out, height_out), Image.BICUBIC, box=box)


# ------------------------------------------------------------------------------------------------ labels & splits
def _class_names(dataset: datasets.Dataset, label_column: str) -> list[str] | None:
    feature = dataset.features.get(label_column)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _check_column(dataset: datasets.Dataset, column: str, argument: str) -> None:
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise ValueError(
            f"Expected one split, got a {type(dataset).__name__} of {list(dataset)}; pass e.g. dataset['train']."
        )
    if column not in dataset.column_names:
        raise ValueError(
            f"Column {column!r} not found; the dataset has columns {dataset.column_names}. "
            f"Pass the right name with `{argument}=`."
        )


def _labels_by_class(dataset: datasets.Dataset, label_column: str) -> dict[int, list[int]]:
    """Row indices grouped by integer label, each list in dataset order."""
    _check_column(dataset, label_column, "label_column")
    labels = np.asarray(list(dataset[label_column]))
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"Column {label_column!r} holds {labels.dtype} values, not integer labels. Encode it first, e.g. "
            f"`dataset = dataset.class_encode_column({label_column!r})`."
        )
    groups: dict[int, list[int]] = {}
    for index, label in enumerate(labels.tolist()):
        groups.setdefault(label, []).append(index)
    return groups


def sample_few_shot(dataset: datasets.Dataset, k: int, seed: int, label_column: str = "label") -> datasets.Dataset:
    """Samples `k` rows per class without replacement (the k-shot training subset, method.md §7).

    Each class's rows are shuffled by one `random.Random(seed)` stream, class after class in label order, and the
    first `k` are kept. The shuffle does not depend on `k`, so for one seed the subsets are nested: the 1-shot rows
    are among the 2-shot rows, which are among the 4-shot rows, and so on. The result keeps the dataset's row order.

    Args:
        dataset (`datasets.Dataset`): the training split (after the train/validation split).
        k (`int`): shots per class, at least 1.
        seed (`int`): the run seed; the same seed gives the same rows.
        label_column (`str`, defaults to `"label"`): the integer (`ClassLabel`) label column.

    Returns:
        `datasets.Dataset`: `k * num_classes` rows.

    Raises:
        `ValueError`: if `k < 1`, or a class has fewer than `k` rows (the message names the class and its count). With a
            `ClassLabel` column every class it names must have `k` rows, including classes absent from `dataset`.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (shots per class) must be an integer >= 1, got {k!r}.")
    groups = _labels_by_class(dataset, label_column)
    names = _class_names(dataset, label_column)
    classes = range(len(names)) if names is not None else sorted(groups)
    short = [(label, len(groups.get(label, []))) for label in classes if len(groups.get(label, [])) < k]
    if short:
        described = ", ".join(
            f"{names[label]!r} (label {label}) has {count}" if names else f"label {label} has {count}"
            for label, count in short[:_MAX_ROWS_IN_MESSAGE]
        )
        more = f" and {len(short) - _MAX_ROWS_IN_MESSAGE} more" if len(short) > _MAX_ROWS_IN_MESSAGE else ""
        raise ValueError(
            f"Cannot sample k={k} images per class without replacement: {described}{more} "
            f"row(s) in {label_column!r}. Use a smaller k (the smallest class has {min(c for _, c in short)})."
        )
    rng = random.Random(seed)
    selected: list[int] = []
    for label in classes:
        indices = list(groups[label])
        rng.shuffle(indices)
        selected.extend(indices[:k])
    return dataset.select(sorted(selected))


def train_validation_split(
    dataset: datasets.Dataset,
    validation_fraction: float = 0.1,
    seed: int = 0,
    label_column: str = "label",
) -> datasets.DatasetDict:
    """Holds out a seeded, class-stratified random `validation_fraction` of `dataset` (method.md §6).

    For datasets without an official validation split the reference holds out a random 10 % of train. This split is
    **stratified**: every class contributes (about) `validation_fraction` of its rows, so small classes are not
    emptied by chance and every class keeps at least one training row. The total is `round(validation_fraction * n)`;
    per-class counts are the floors of their shares plus one for the classes with the largest remainders (ties
    broken by the seed), never taking a class's last row. Which rows go to validation is a seeded shuffle per class.

    Args:
        dataset (`datasets.Dataset`): the full training split.
        validation_fraction (`float`, defaults to 0.1): fraction of rows to hold out, in (0, 1).
        seed (`int`, defaults to 0): the run seed.
        label_column (`str`, defaults to `"label"`): the integer (`ClassLabel`) label column.

    Returns:
        `datasets.DatasetDict` with `"train"` and `"validation"`, both in the dataset's row order.

    Raises:
        `ValueError`: if the fraction is outside (0, 1), rounds to no validation row, or asks for more rows than
            remain once every class keeps one training row.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}.")
    groups = _labels_by_class(dataset, label_column)
    total = len(dataset)
    target = round(validation_fraction * total)
    if target < 1:
        raise ValueError(
            f"validation_fraction={validation_fraction} of {total} rows rounds to 0 validation rows; "
            "use a larger fraction or an explicit validation set."
        )
    capacity = total - len(groups)  # every class keeps one training row
    if target > capacity:
        raise ValueError(
            f"Cannot hold out {target} of {total} rows while keeping a training row in each of the {len(groups)} "
            f"classes (at most {capacity}); use a smaller validation_fraction."
        )
    rng = random.Random(seed)
    labels = sorted(groups)
    shares = {label: target * len(groups[label]) / total for label in labels}
    # A floor never takes a class's last row (share < class size as target < total); the loop
    # below hands out the rest under the same rule.
    counts = {label: math.floor(shares[label]) for label in labels}
    # Largest remainder first, seeded tie-break; loop in case capped classes leave rows to hand out.
    order = sorted(labels, key=lambda label: (-(shares[label] - math.floor(shares[label])), rng.random()))
    remaining = target - sum(counts.values())
    while remaining > 0:
        for label in order:
            if remaining and counts[label] < len(groups[label]) - 1:
                counts[label] += 1
                remaining -= 1
    validation: list[int] = []
    for label in labels:
        indices = list(groups[label])
        rng.shuffle(indices)
        validation.extend(indices[: counts[label]])
    held_out = set(validation)
    train = [index for index in range(total) if index not in held_out]
    return datasets.DatasetDict({"train": dataset.select(train), "validation": dataset.select(sorted(validation))})


def align_label_names(
    dataset: datasets.Dataset,
    class_names: Sequence[str],
    label_column: str = "label",
    split_name: str = "evaluation",
) -> datasets.Dataset:
    """Maps the labels of `dataset` onto `class_names` (the training classes, by label id) **by name**.

    A test split whose `ClassLabel` lists the same names in another order would otherwise be scored against the
    wrong classes. Names are matched as `datasets.Dataset.align_labels_with_mapping` matches them (case-insensitive)
    and that method does the remapping; a split already in the training order is returned unchanged. The split may
    hold fewer classes than training. Plain integer labels carry no names: they are taken as training label ids
    only when the split holds exactly `len(class_names)` distinct labels, all in range.

    Args:
        dataset (`datasets.Dataset`): the split to evaluate.
        class_names (`Sequence[str]`): the training class names by label id (the training `ClassLabel` names).
        label_column (`str`, defaults to `"label"`): the label column.
        split_name (`str`, defaults to `"evaluation"`): names the split in error messages.

    Returns:
        `datasets.Dataset`: `dataset` with labels that index `class_names` and a `ClassLabel(names=class_names)`
        feature (or `dataset` itself when nothing needs to change).

    Raises:
        `ValueError`: naming the classes of the split that training does not have, or for integer labels whose count
            does not agree.
    """
    _check_column(dataset, label_column, "label_column")
    class_names = list(class_names)
    feature = dataset.features[label_column]
    if isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
        present = set(dataset[label_column])
        if len(present) != len(class_names) or not present <= set(range(len(class_names))):
            raise ValueError(
                f"The {split_name} split's {label_column!r} column holds plain integers without class names "
                f"({len(present)} distinct values: {sorted(present)[:_MAX_ROWS_IN_MESSAGE]}), which cannot be "
                f"matched to the {len(class_names)} training classes by name. Cast it to the training names: "
                f"`dataset.cast_column({label_column!r}, datasets.ClassLabel(names=class_names))` once you know "
                "its ids follow the training order."
            )
        return dataset
    if not isinstance(feature, datasets.ClassLabel):
        raise ValueError(
            f"The {split_name} split's {label_column!r} column has type {feature!r}, not class labels. Encode it "
            f"with `dataset.class_encode_column({label_column!r})`, or pass the right `label_column=`."
        )
    lowered = [name.lower() for name in class_names]
    if len(set(lowered)) != len(lowered):
        raise ValueError(f"The training class names {class_names} differ only in case; names must be unique.")
    if [name.lower() for name in feature.names] == lowered[: len(feature.names)]:
        return dataset  # already in the training order
    used = {feature.names[label] for label in set(dataset[label_column]) if label is not None and label >= 0}
    unknown = sorted(name for name in used if name.lower() not in lowered)
    if unknown:
        raise ValueError(
            f"The {split_name} split has rows of {len(unknown)} class(es) that training does not have: {unknown}. "
            f"The training classes are {class_names}. Rename them in the split's ClassLabel, or remove those rows."
        )
    # names of the split without rows are never looked up, so they need no training id
    return dataset.align_labels_with_mapping(dict(zip(class_names, range(len(class_names)))), label_column)


# ------------------------------------------------------------------------------------------------------ validation
def empty_caption_rows(dataset: datasets.Dataset, caption_column: str = "captions") -> list[int]:
    """Indices of the rows whose caption list is empty (they train on the class template alone).

    Args:
        dataset (`datasets.Dataset`): a captioned dataset.
        caption_column (`str`, defaults to `"captions"`): the `List(string)` caption column.

    Returns:
        `list[int]`: row indices, ascending.
    """
    _check_column(dataset, caption_column, "caption_column")
    return [index for index, captions in enumerate(dataset[caption_column]) if captions is not None and not captions]


def _rows_message(rows: Sequence[tuple[int, str]]) -> str:
    lines = [f"  row {index}: {reason}" for index, reason in rows[:_MAX_ROWS_IN_MESSAGE]]
    if len(rows) > _MAX_ROWS_IN_MESSAGE:
        lines.append(f"  ... and {len(rows) - _MAX_ROWS_IN_MESSAGE} more")
    return "\n".join(lines)


def _check_images(dataset: datasets.Dataset, image_column: str) -> None:
    """Decodes every image, collecting the rows that fail, and raises one error that lists them all."""
    feature = dataset.features[image_column]
    if isinstance(feature, datasets.Image) and feature.decode:
        # Read the raw bytes/path so a bad file fails in our hands (with its row), not inside `dataset[i]`.
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    bad: list[tuple[int, str]] = []
    for index, value in enumerate(dataset[image_column]):
        try:
            image = load_image(value)
            if image.width < 1 or image.height < 1:
                raise ValueError("the image has no pixels")
        except IMAGE_DECODE_ERRORS as error:
            bad.append((index, f"{type(error).__name__}: {error}{describe_image_source(value)}"))
    if bad:
        raise ValueError(
            f"{len(bad)} of {len(dataset)} image(s) in column {image_column!r} cannot be decoded:\n"
            f"{_rows_message(bad)}\n"
            "Replace or re-encode these files, or remove the rows explicitly, e.g. "
            "`dataset = dataset.select([i for i in range(len(dataset)) if i not in bad_rows])`."
        )


def validate_captioned_dataset(
    dataset: datasets.Dataset,
    image_column: str = "image",
    label_column: str = "label",
    caption_column: str = "captions",
    require_captions: bool = True,
    class_names: Sequence[str] | None = None,
    check_images: bool = False,
) -> list[str]:
    """Checks that `dataset` can be trained on and returns its class names; never drops or changes rows.

    Checked: the columns exist; the labels are integers in `[0, num_classes)` with class names from a `ClassLabel`
    column or `class_names`; every caption entry is a list of strings. Empty caption lists are allowed (the
    collator then uses the class template alone) and logged with their count. Images are decoded only with
    `check_images=True`; otherwise a corrupt file surfaces when its row is read (`datasets.Image` decodes in
    `dataset[i]`, before the collator, with an error that does not name the row), so run this once with
    `check_images=True` on a new dataset.

    Args:
        dataset (`datasets.Dataset`): a captioned dataset (one split).
        image_column (`str`, defaults to `"image"`): the image column.
        label_column (`str`, defaults to `"label"`): the integer label column (`ClassLabel`, or integers with
            `class_names`).
        caption_column (`str`, defaults to `"captions"`): the `List(string)` caption column.
        require_captions (`bool`, defaults to `True`): require the caption column (set `False` for evaluation
            splits or class-template-only training; a caption column that exists is still checked).
        class_names (`Sequence[str]`, *optional*): class names by label id. Required for a plain integer label
            column; with a `ClassLabel` column it must have as many names and replaces them (e.g. CLIP-style
            descriptive names for GTSRB).
        check_images (`bool`, defaults to `False`): decode every image and report the rows of unreadable,
            corrupt or zero-byte files.

    Returns:
        `list[str]`: the class names, indexed by label id.

    Raises:
        `ValueError`: naming the column and the fix (and the row, for a bad value).
    """
    _check_column(dataset, image_column, "image_column")
    _check_column(dataset, label_column, "label_column")
    has_captions = caption_column in dataset.column_names
    if require_captions and not has_captions:
        _check_column(dataset, caption_column, "caption_column")  # raises, listing the columns

    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        if class_names is not None:
            if len(class_names) != len(names):
                raise ValueError(
                    f"class_names has {len(class_names)} names but the ClassLabel column {label_column!r} has "
                    f"{len(names)} classes; pass one name per class, in label order."
                )
            names = list(class_names)
    elif isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
        if class_names is None:
            raise ValueError(
                f"Column {label_column!r} holds plain integers ({feature.dtype}) without class names. Pass "
                f"`class_names=[...]`, or cast it: `dataset = dataset.cast_column({label_column!r}, "
                "datasets.ClassLabel(names=[...]))`."
            )
        names = list(class_names)
    else:
        raise ValueError(
            f"Column {label_column!r} has type {feature!r}, not integer class labels. Encode it, e.g. "
            f"`dataset = dataset.class_encode_column({label_column!r})`, or pass the right `label_column=`."
        )
    if not names:
        raise ValueError(f"Column {label_column!r} defines no classes.")
    for position, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"Class name {position} is {name!r}; every class needs a non-empty string name.")

    for index, label in enumerate(dataset[label_column]):
        if label is None or not 0 <= label < len(names):
            meaning = " (-1 means no label)" if label == -1 else ""
            raise ValueError(
                f"Row {index}: {label_column!r} is {label!r}{meaning}, outside the {len(names)} classes "
                f"[0, {len(names) - 1}]. Fix the label, remove the row, or pass the full `class_names=`."
            )

    if has_captions:
        empty = []
        for index, captions in enumerate(dataset[caption_column]):
            if captions is None or isinstance(captions, str) or not isinstance(captions, Sequence):
                raise ValueError(
                    f"Row {index}: {caption_column!r} is {type(captions).__name__} {captions!r:.80}, not a list of "
                    f"strings. Store captions as `datasets.List(datasets.Value('string'))` (use [] for none, "
                    f"[text] for a single caption), or pass the right `caption_column=`."
                )
            for position, caption in enumerate(captions):
                if not isinstance(caption, str):
                    raise ValueError(
                        f"Row {index}: {caption_column!r}[{position}] is {type(caption).__name__} {caption!r:.80}, "
                        "not a string. Replace it with text or remove it from the list."
                    )
            if not captions:
                empty.append(index)
        if empty:
            shown = ", ".join(str(index) for index in empty[:_MAX_ROWS_IN_MESSAGE])
            more = ", ..." if len(empty) > _MAX_ROWS_IN_MESSAGE else ""
            logger.warning(
                f"{len(empty)} of {len(dataset)} rows have an empty {caption_column!r} list (rows {shown}{more}); "
                "they train on the class template alone. `empty_caption_rows(dataset)` lists them all."
            )

    if check_images:
        _check_images(dataset, image_column)
    return names


# ------------------------------------------------------------------------------------ training rows and texts
ROW_INDEX_COLUMN = "__mmft_row__"


def with_template_captions(
    dataset: datasets.Dataset,
    class_names: Sequence[str],
    templates: Sequence[str],
    label_column: str,
    caption_column: str,
) -> datasets.Dataset:
    """Replaces the captions of every row by `templates` filled with its class name (FLYP and FLYP-ens texts)."""
    texts = [[template.format(name) for template in templates] for name in class_names]
    labels = dataset[label_column]
    if caption_column in dataset.column_names:
        dataset = dataset.remove_columns(caption_column)
    return dataset.add_column(
        caption_column, [texts[label] for label in labels], feature=datasets.List(datasets.Value("string"))
    )


def with_row_errors(dataset, image_column: str):
    """Decodes images in the collator rather than in `datasets`, with each row's index at hand.

    `datasets.Image()` decodes when a row is read, so a corrupt file fails there without saying which row. With
    `Image(decode=False)` and a row-index column, `MMFTDataCollator` decodes and names the row, column and file.
    """
    if not isinstance(dataset, datasets.Dataset):
        return dataset
    feature = dataset.features.get(image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    if ROW_INDEX_COLUMN not in dataset.column_names:
        dataset = dataset.add_column(ROW_INDEX_COLUMN, list(range(len(dataset))))
    return dataset
