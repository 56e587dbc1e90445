"""Texts behind each class prototype: every caption of every training image of the class (method.md §3-4), or every
sentence of them when training drew sentences (`caption_sampling="sentence"`).

`class_texts_from_captions` works on plain lists (the trainer calls it at every evaluation);
`prototypes_from_captioned_dataset` reads a captioned `datasets.Dataset` and encodes the texts into prototypes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..captioning.sentences import CAPTION_SAMPLINGS, caption_units
from .prototypes import SINGLE_TEMPLATE, build_class_prototypes

DEFAULT_CLASS_TEMPLATE = "a photo of a {}."
DEFAULT_FALLBACK_TEMPLATE = SINGLE_TEMPLATE[0]  # a class without captions gets the zero-shot single template


def class_texts_from_captions(
    captions: Sequence[Sequence[str] | None],
    labels: Sequence[int],
    class_names: Sequence[str],
    class_template: str | None = DEFAULT_CLASS_TEMPLATE,
    fallback_template: str = DEFAULT_FALLBACK_TEMPLATE,
    caption_sampling: str = "caption",
) -> list[list[str]]:
    """Groups the captions of each class into the texts averaged into its prototype.

    Each training unit, a caption or (with `caption_sampling="sentence"`) each sentence of a caption, becomes
    `"{class_template.format(name)} {unit}"` (MMFT mode: `"a photo of a cat. <caption>"`), or the unit alone when
    `class_template` is `None`: the texts the model was trained on. A class without any caption gets the single text
    `fallback_template.format(name)`. Empty or whitespace-only captions are skipped. Class names are used as given:
    normalise them (lower case, `_`/`-` to spaces) before calling, as for the training texts.

    Args:
        captions (`Sequence[Sequence[str] | None]`): per training row, its captions (`None` or `[]` for none).
        labels (`Sequence[int]`): per training row, its class index.
        class_names (`Sequence[str]`): the class names, indexed by label.
        class_template (`str`, *optional*, defaults to `"a photo of a {}."`): prefix template with `{}` for the
            class name; `None` uses the bare captions.
        fallback_template (`str`, defaults to `"a photo of a {}"`): the text of a class with no captions.
        caption_sampling (`str`, defaults to `"caption"`): the training unit, `"caption"` or `"sentence"` (see
            `MMFTTrainingArguments.caption_sampling`; a checkpoint records it in its prototypes' metadata).

    Returns:
        `list[list[str]]`: for each class index, its texts (never empty), in row, caption then sentence order.
    """
    if len(captions) != len(labels):
        raise ValueError(f"Got {len(captions)} caption lists but {len(labels)} labels; pass one of each per row.")
    if caption_sampling not in CAPTION_SAMPLINGS:
        raise ValueError(f"caption_sampling must be one of {CAPTION_SAMPLINGS}, got {caption_sampling!r}.")
    for name, template in (("class_template", class_template), ("fallback_template", fallback_template)):
        if template is not None and "{}" not in template:
            raise ValueError(f"{name} {template!r} has no '{{}}' placeholder for the class name.")
    num_classes = len(class_names)
    prefixes = [None if class_template is None else class_template.format(name) + " " for name in class_names]
    texts: list[list[str]] = [[] for _ in range(num_classes)]
    for row, (row_captions, label) in enumerate(zip(captions, labels)):
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_classes:
            raise ValueError(
                f"Row {row}: label {label!r} is not a class index in [0, {num_classes}); "
                f"there are {num_classes} class names."
            )
        if row_captions is None:
            continue
        if isinstance(row_captions, str):
            raise ValueError(f"Row {row}: captions must be a list of strings, got a single string {row_captions!r}.")
        prefix, bucket = prefixes[label], texts[label]
        for caption in row_captions:
            if not isinstance(caption, str):
                raise ValueError(f"Row {row}: caption {caption!r} is not a string.")
            for unit in caption_units(caption, caption_sampling):
                bucket.append(unit if prefix is None else prefix + unit)
    for label, bucket in enumerate(texts):
        if not bucket:
            bucket.append(fallback_template.format(class_names[label]))
    return texts


def prototypes_from_captioned_dataset(
    model: torch.nn.Module,
    processor_or_tokenizer,
    dataset,
    *,
    label_column: str = "label",
    caption_column: str = "captions",
    class_names: Sequence[str] | None = None,
    class_template: str | None = DEFAULT_CLASS_TEMPLATE,
    fallback_template: str = DEFAULT_FALLBACK_TEMPLATE,
    caption_sampling: str = "caption",
    batch_size: int = 256,
) -> tuple[torch.Tensor, list[str]]:
    """Class prototypes of a trained model from a captioned dataset (the training subset only, method.md §4).

    Args:
        model (`torch.nn.Module`): a dual encoder with `get_text_features` (e.g. a fine-tuned `CLIPModel`).
        processor_or_tokenizer: the model's processor (its `.tokenizer` is used) or tokenizer.
        dataset (`datasets.Dataset`): rows with a label and a list of captions; images are not decoded.
        label_column (`str`, defaults to `"label"`): a `ClassLabel` column, integer class indices (then pass
            `class_names`) or class-name strings.
        caption_column (`str`, defaults to `"captions"`): a list-of-strings column.
        class_names (`Sequence[str]`, *optional*): defaults to the `ClassLabel` names; with string labels, to the
            sorted distinct labels.
        class_template (`str`, *optional*, defaults to `"a photo of a {}."`): see `class_texts_from_captions`.
        fallback_template (`str`, defaults to `"a photo of a {}"`): text of a class without captions.
        caption_sampling (`str`, defaults to `"caption"`): the unit the model was trained on, `"caption"` or
            `"sentence"`; for a saved checkpoint, `load_class_prototypes(path)[2].get("caption_sampling", "caption")`.
        batch_size (`int`, defaults to 256): texts encoded per forward pass.

    Returns:
        `(prototypes, labels)`: a `[num_classes, dim]` float32 tensor of unit rows and the class names.
    """
    missing = [column for column in (label_column, caption_column) if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The dataset has no column(s) {missing}; its columns are {dataset.column_names}. "
            "Pass `label_column=`/`caption_column=`."
        )
    tokenizer = getattr(processor_or_tokenizer, "tokenizer", None) or processor_or_tokenizer
    columns = dataset.select_columns([label_column, caption_column])  # never decode the images
    labels = list(columns[label_column])
    captions = list(columns[caption_column])
    feature = dataset.features[label_column]
    if class_names is None and hasattr(feature, "names"):
        class_names = list(feature.names)
    if labels and all(isinstance(label, str) for label in labels):
        class_names = list(class_names) if class_names is not None else sorted(set(labels))
        index = {name: position for position, name in enumerate(class_names)}
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise ValueError(f"Labels {unknown} in column {label_column!r} are not among class_names {class_names}.")
        labels = [index[label] for label in labels]
    if class_names is None:
        raise ValueError(
            f"Column {label_column!r} is not a ClassLabel, so the class names are unknown; pass `class_names=[...]`."
        )
    texts = class_texts_from_captions(
        captions, labels, class_names, class_template, fallback_template, caption_sampling
    )
    return build_class_prototypes(model, tokenizer, texts, batch_size=batch_size), list(class_names)
