"""Zero-shot retention: how well a model still classifies *another* dataset zero-shot, before and after
fine-tuning (and at each WiSE-FT alpha), so that a user sees what fine-tuning cost.

```python
from mmft_hf.evaluation.retention import RetentionSet, load_retention_set
retention = load_retention_set("synthetic")                 # or a Hub id / folder with image and label columns
before = retention.accuracy(model, processor)                # zero-shot, "a photo of a {class name}"
```

`mmft-hf finetune` and `mmft-hf benchmark` take the same `--retention_*` flags, declared once here
(`RetentionArguments`, the "retention" section of their `--help`) and loaded by `retention_set_from_flags`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import datasets
import torch

from ..captioning.prompts import normalize_class_name, read_class_names
from ..classification.prototypes import SINGLE_TEMPLATE, zero_shot_prototypes
from ..encoders import eval_mode, model_device, pooled_output
from ..training.collator import MMFTDataCollator

# `--retention_dataset synthetic`: another draw of the synthetic shapes, with classes the demo never trains on.
SYNTHETIC_RETENTION = "synthetic"
SYNTHETIC_RETENTION_CLASSES = 8  # classes 8..15 of `synthetic_class_names`; the demo trains on the first 8


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def zero_shot_accuracy(
    model: torch.nn.Module,
    processor,
    dataset: datasets.Dataset,
    class_names: Sequence[str],
    templates: Sequence[str] = SINGLE_TEMPLATE,
    image_column: str = "image",
    label_column: str = "label",
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy of `model` on `dataset` as a zero-shot classifier: each image goes to the class whose
    template prototype (`zero_shot_prototypes`, the `zeroshot` method's `"a photo of a {}"` by default) is nearest.

    Args:
        model (`torch.nn.Module`): a dual encoder (or a peft model wrapping one); left in the mode it was in.
        processor: its processor (`.tokenizer`, `.image_processor`); images are prepared as in evaluation.
        dataset (`datasets.Dataset`): labelled images.
        class_names (`Sequence[str]`): the names filled into the templates, by label id (normalised here as in
            training: lower case, `_`/`-` to spaces).
        templates (`Sequence[str]`, defaults to `SINGLE_TEMPLATE`): prompt templates with one `{}`.
        image_column (`str`, defaults to `"image"`) / label_column (`str`, defaults to `"label"`): the columns.
        batch_size (`int`, defaults to 256): images (and texts) per forward pass.

    Returns:
        `float`: the fraction of correctly classified images.
    """
    model = _base_model(model)
    names = [normalize_class_name(name) for name in class_names]
    prototypes = zero_shot_prototypes(model, processor.tokenizer, names, templates, batch_size)
    collator = MMFTDataCollator(
        processor=processor,
        class_names=names,
        image_column=image_column,
        label_column=label_column,
        caption_column=None,
        train=False,
    )
    rows = dataset.select_columns([image_column, label_column])
    correct = total = 0
    device = model_device(model)
    with eval_mode(model):
        for start in range(0, len(rows), batch_size):
            batch = collator([rows[index] for index in range(start, min(start + batch_size, len(rows)))])
            labels = batch.pop("labels").to(device)
            image_inputs = {k: v.to(device) for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
            features = pooled_output(model.get_image_features(**image_inputs)).float()
            scores = torch.nn.functional.normalize(features, dim=-1) @ prototypes.to(device).T
            correct += int((scores.argmax(-1) == labels).sum())
            total += len(labels)
    if total == 0:
        raise ValueError("The retention split has no rows; choose a split with labelled images.")
    return correct / total


@dataclass
class RetentionSet:
    """A labelled split whose zero-shot accuracy is tracked through fine-tuning.

    Args:
        name (`str`): how results name it (the `--retention_dataset` value).
        dataset (`datasets.Dataset`): the labelled images.
        class_names (`list[str]`): class names by label id.
        image_column (`str`, defaults to `"image"`) / label_column (`str`, defaults to `"label"`): the columns.
    """

    name: str
    dataset: datasets.Dataset
    class_names: list[str]
    image_column: str = "image"
    label_column: str = "label"

    def accuracy(self, model: torch.nn.Module, processor, batch_size: int = 256) -> float:
        """Zero-shot accuracy of `model` on this set (`zero_shot_accuracy` with the single template)."""
        return zero_shot_accuracy(
            model, processor, self.dataset, self.class_names, SINGLE_TEMPLATE, self.image_column, self.label_column,
            batch_size,
        )  # fmt: skip


@dataclass
class RetentionArguments:
    """The `--retention_*` flags, one declaration for every command that measures zero-shot retention (an
    `HfArgumentParser` dataclass; `--help` lists its flags under "retention")."""

    _argument_group_name = "retention"  # a heading in --help (`HfArgumentParser`)

    retention_dataset: str | None = field(
        default=None,
        metadata={"help": "Zero-shot retention: a labelled dataset (Hub id, directory, or 'synthetic': shapes of "
                  "classes the demo does not train on) whose zero-shot accuracy is measured with the starting and "
                  "the final model (and per WiSE-FT alpha): retention_accuracy_before / _after in all_results.json "
                  "and the card (finetune), in every cell's results and a second table (benchmark)."},
    )  # fmt: skip
    retention_dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration name."})
    retention_split: str = field(default="test", metadata={"help": "The retention dataset's evaluated split."})
    retention_class_names: str | None = field(
        default=None,
        metadata={"help": "File with the retention dataset's class names, one per line (default: its ClassLabel)."},
    )


def retention_set_from_flags(
    flags: RetentionArguments, training_args, cache_dir: str | None = None
) -> RetentionSet | None:
    """The `--retention_dataset` split of a command (`finetune`, `benchmark`), or `None` without one.

    Args:
        flags (`RetentionArguments`): the command's retention flags.
        training_args (`MMFTTrainingArguments`): its `image_column` and `label_column` apply to the retention set.
        cache_dir (`str`, *optional*): where downloaded datasets are kept.
    """
    if flags.retention_dataset is None:
        return None
    return load_retention_set(
        flags.retention_dataset,
        split=flags.retention_split,
        config_name=flags.retention_dataset_config_name,
        class_names=flags.retention_class_names,
        image_column=training_args.image_column,
        label_column=training_args.label_column,
        cache_dir=cache_dir,
    )


def load_retention_set(
    name: str,
    split: str = "test",
    config_name: str | None = None,
    class_names: Sequence[str] | str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    cache_dir: str | None = None,
) -> RetentionSet:
    """Loads the retention split.

    Args:
        name (`str`): `"synthetic"` (another draw of the synthetic shapes with 8 classes the demo never trains on),
            a Hub id, a Hub-layout folder or a `save_to_disk` folder.
        split (`str`, defaults to `"test"`): the split whose zero-shot accuracy is measured.
        config_name (`str`, *optional*): the dataset configuration.
        class_names (`Sequence[str]` or `str`, *optional*): the class names by label id, or a text file with one per
            line (as `mmft-hf caption --class_names` reads it); default: the label column's `ClassLabel` names.
        image_column (`str`, defaults to `"image"`) / label_column (`str`, defaults to `"label"`): the columns.
        cache_dir (`str`, *optional*): where downloaded datasets are kept.

    Raises:
        `ValueError`: for a missing split or column, labels without names, or a class-name count that does not
            match the labels.
    """
    if name == SYNTHETIC_RETENTION:
        from ..synthetic import make_synthetic_dataset

        raw = make_synthetic_dataset(
            num_classes=SYNTHETIC_RETENTION_CLASSES,
            first_class=SYNTHETIC_RETENTION_CLASSES,
            train_per_class=0,
            eval_per_class=8,
            seed=1,
        )
    elif os.path.isdir(name) and any(
        os.path.exists(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json")
    ):
        raw = datasets.load_from_disk(name)
    else:
        raw = datasets.load_dataset(name, config_name, cache_dir=cache_dir)
    if isinstance(raw, datasets.Dataset):
        raw = datasets.DatasetDict({split: raw})
    if split not in raw:
        raise ValueError(f"The retention split {split!r} is not in {name!r} (it has {list(raw)}); set "
                         "--retention_split.")  # fmt: skip
    dataset = raw[split]
    for column in (image_column, label_column):
        if column not in dataset.column_names:
            raise ValueError(f"The retention dataset {name!r} has no column {column!r} (it has "
                             f"{dataset.column_names}). It is read with the training data's column names "
                             "(--image_column, --label_column): rename its columns to match.")  # fmt: skip
    if isinstance(class_names, str):
        class_names = read_class_names(class_names)
    feature = dataset.features[label_column]
    if class_names is None:
        if not isinstance(feature, datasets.ClassLabel):
            raise ValueError(f"The retention dataset's {label_column!r} column has no class names (not a ClassLabel);"
                             " pass --retention_class_names with a file of one name per line.")  # fmt: skip
        class_names = feature.names
    class_names = list(class_names)
    labels = dataset[label_column]
    if labels and (min(labels) < 0 or max(labels) >= len(class_names)):
        raise ValueError(f"The retention dataset's labels run from {min(labels)} to {max(labels)}, but "
                         f"{len(class_names)} class names were given; give one name per label id.")  # fmt: skip
    return RetentionSet(name, dataset, class_names, image_column, label_column)
