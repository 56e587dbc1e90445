"""The cross-entropy baseline: the image tower with a linear head initialised from zero-shot prototypes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from transformers import Trainer
from transformers.utils import logging

from ..captioning.prompts import normalize_class_name
from ..classification.prototypes import OPENAI_IMAGENET_TEMPLATES, zero_shot_prototypes
from ..training.arguments import MMFTTrainingArguments
from ..training.collator import MMFTDataCollator
from ..training.data import ROW_INDEX_COLUMN, with_row_errors
from ..training.trainer import decay_parameter_names

logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------------------------- CE fine-tuning
def check_ce_arguments(args: MMFTTrainingArguments) -> None:
    """Raises `ValueError` with `args.use_lora`: the CE baseline fine-tunes the whole image tower and a linear head;
    it has no LoRA variant."""
    if args.use_lora:
        raise ValueError(
            "Method 'ce' does not support --use_lora (it fine-tunes the whole image tower); run it "
            "without --use_lora, in a separate --output_dir from the LoRA methods."
        )


class ZeroShotLinearClassifier(torch.nn.Module):
    """Image tower + a linear head initialised from zero-shot text prototypes (WiSE-FT's CE fine-tuning baseline).

    `logits = head(normalize(visual_projection(vision_model(x).pooler_output)))` with `head.weight` initialised to
    `exp(logit_scale) * prototypes` and a zero bias, so before training it predicts exactly what zero-shot CLIP
    predicts. Only the image tower is kept (the text tower would be unused parameters under DDP).

    Args:
        model (`PreTrainedModel`): a dual encoder with `vision_model`, `visual_projection` and `logit_scale`.
        prototypes (`torch.Tensor`): `[num_classes, dim]` unit-norm zero-shot text embeddings.
    """

    def __init__(self, model: torch.nn.Module, prototypes: torch.Tensor):
        super().__init__()
        for name in ("vision_model", "visual_projection", "logit_scale"):
            if not hasattr(model, name):
                raise ValueError(f"CE fine-tuning needs a CLIP-style model with `{name}`; {type(model).__name__}.")
        self.vision_model, self.visual_projection = model.vision_model, model.visual_projection
        self.head = torch.nn.Linear(prototypes.shape[1], prototypes.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(model.logit_scale.exp().detach() * prototypes.to(self.head.weight))
            self.head.bias.zero_()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        features = self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)
        logits = self.head(torch.nn.functional.normalize(features, dim=-1))
        outputs = {"logits": logits}
        if labels is not None:
            outputs["loss"] = torch.nn.functional.cross_entropy(logits.float(), labels)
        return outputs


@dataclass
class _ImagesAndLabels:
    """An `MMFTDataCollator` batch without the texts: the CE baseline reads images exactly as MMFT does."""

    collator: MMFTDataCollator

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collator(rows)
        return {"pixel_values": batch["pixel_values"], "labels": batch["labels"]}


def _accuracy(eval_prediction) -> dict[str, float]:
    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


class CETrainer(Trainer):
    """The `transformers.Trainer` of the CE baseline: MMFT's weight-decay rule, and a collator of its own (no random
    crop) for evaluation and test batches.

    Args:
        eval_data_collator: collates evaluation and test batches; `data_collator` collates training batches.
        *args, **kwargs: passed to `transformers.Trainer`.
    """

    def __init__(self, *args, eval_data_collator, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        return decay_parameter_names(self, model)

    def _evaluation_loader(self, make_loader, dataset):
        training_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return make_loader(dataset)
        finally:
            self.data_collator = training_collator

    def get_eval_dataloader(self, eval_dataset=None):
        return self._evaluation_loader(super().get_eval_dataloader, eval_dataset)

    def get_test_dataloader(self, test_dataset):
        return self._evaluation_loader(super().get_test_dataloader, test_dataset)


def build_ce_trainer(
    model, processor, splits: datasets.DatasetDict, args: MMFTTrainingArguments, class_names: Sequence[str]
) -> CETrainer:
    """The trainer of the CE baseline: a `ZeroShotLinearClassifier` fine-tuned with cross-entropy.

    The head starts as the `zeroshot_ensemble` classifier: the 80-template prototypes of the class names normalised
    as `MMFTTrainer` does (`normalize_class_name`). Images go through `MMFTDataCollator` as in MMFT (training crop,
    per-worker random streams, decoding errors that name the row). Weight decay follows
    `args.weight_decay_all_parameters`; `eval_accuracy` on the validation split drives the selection.

    Args:
        model (`PreTrainedModel`): a CLIP-style dual encoder (see `ZeroShotLinearClassifier`).
        processor (`ProcessorMixin`): its processor (tokenizer and image processor).
        splits (`datasets.DatasetDict`): `train`, `validation` and `test`.
        args (`MMFTTrainingArguments`): the cell's arguments.
        class_names (`Sequence[str]`): the dataset's class names, by label id.

    Returns:
        `CETrainer`, with the prepared test split as `trainer.test_dataset`.

    Raises:
        `ValueError`: with `args.use_lora`, or when `class_names` does not name each class of the training split's
            label feature exactly once by id (a longer or shorter list would mislabel the head's rows).
    """
    check_ce_arguments(args)
    label = splits["train"].features.get(args.label_column)
    if isinstance(label, datasets.ClassLabel) and len(class_names) != label.num_classes:
        raise ValueError(
            f"{len(class_names)} class names for the {label.num_classes} classes of the label column "
            f"{args.label_column!r}; give one name per label id, in label-id order."
        )
    text_class_names = [normalize_class_name(name) for name in class_names]
    model.eval()
    prototypes = zero_shot_prototypes(model, processor.tokenizer, text_class_names, OPENAI_IMAGENET_TEMPLATES)
    classifier = ZeroShotLinearClassifier(model, prototypes)
    common = dict(
        class_names=text_class_names,
        image_column=args.image_column,
        label_column=args.label_column,
        caption_column=None,
        index_column=ROW_INDEX_COLUMN,
    )
    train_collator = MMFTDataCollator(processor, crop_scale=(args.crop_scale_min, 1.0), seed=args.seed, **common)
    eval_collator = MMFTDataCollator(processor, train=False, **common)
    prepared = {name: with_row_errors(split, args.image_column) for name, split in splits.items()}
    trainer = CETrainer(
        model=classifier,
        args=args,
        train_dataset=prepared["train"],
        eval_dataset=prepared["validation"],
        data_collator=_ImagesAndLabels(train_collator),
        eval_data_collator=_ImagesAndLabels(eval_collator),
        compute_metrics=_accuracy,
    )
    trainer.test_dataset = prepared["test"]
    return trainer
