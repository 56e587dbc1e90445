"""`MMFTTrainer`: a `transformers.Trainer` that fine-tunes a dual encoder on (image, caption) pairs with the MMFT
loss and evaluates it as a classifier built from class-averaged caption embeddings."""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import datasets
import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer
from transformers.utils import logging

from ..captioning.prompts import normalize_class_name
from ..captioning.provenance import caption_provenance, provenance_captioners
from ..classification.class_texts import class_texts_from_captions
from ..classification.prototypes import (
    OPENAI_IMAGENET_TEMPLATES,
    SINGLE_TEMPLATE,
    build_class_prototypes,
    pooled_output,
    save_class_prototypes,
    template_texts,
)
from ..encoders import max_text_length, text_padding
from ..model_card import MMFTModelCardData, create_model_card
from ..publishing import save_for_hub
from .arguments import MMFTTrainingArguments
from .collator import EpochKeyedDataset, EpochSampler, MMFTDataCollator
from .data import (
    ROW_INDEX_COLUMN,
    align_label_names,
    validate_captioned_dataset,
    with_row_errors,
    with_template_captions,
)
from .distributed import gather_batch, global_logits
from .grad_cache import RandomState, cached_gradient_objective, split_rows
from .losses import mmft_loss

logger = logging.get_logger(__name__)

EXTRA_PARAMETERS_FILENAME = "mmft_extra_parameters.safetensors"


@contextmanager
def _without_weight_writing_bars() -> Iterator[None]:
    """Turns transformers' own progress bars (such as "Writing model shards") off inside the block."""
    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


# The private `transformers.Trainer` members this trainer overrides or relies on, with their parameters as checked
# against transformers 5.21.0 (setup.cfg's floor) and 5.25.0. tests/training/test_transformers_private_api.py
# fails when one is renamed, removed or changes its parameters: re-check the override, then update this table.
TRANSFORMERS_CHECKED = ("5.21.0", "5.25.0")
TRANSFORMERS_PRIVATE_METHODS = {
    # overridden
    "_get_train_sampler": ("self", "train_dataset"),  # EpochSampler: exact resume
    "_save": ("self", "output_dir", "state_dict"),  # + class prototypes and LoRA's logit scale
    "_load_best_model": ("self",),  # + the logit scale beside a LoRA adapter
    "_load_from_checkpoint": ("self", "resume_from_checkpoint", "model"),  # same
    # called
    "_get_dataloader": ("self", "dataset", "description", "batch_size", "sampler_fn", "is_training", "dataloader_key"),
    "_prepare_inputs": ("self", "inputs"),  # the gradient-cached step prepares its batch as training_step does
}
TRANSFORMERS_PRIVATE_ATTRIBUTES = (
    "_train_batch_size",  # set by Trainer.__init__, read by get_train_dataloader
    "loss_is_scaled_for_ga",  # class attribute: False, Trainer divides the loss by the accumulation steps
    "current_gradient_accumulation_steps",  # set by the training loop; the gradient-cached step divides by it
)


def _unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft `PeftModel` (attribute access goes through the LoRA layers)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_contrastive_batch(args: MMFTTrainingArguments, train_dataset) -> None:
    """Refuses an empty training split and a contrastive batch without negatives; warns once when gradient
    accumulation makes the optimiser batch larger than the contrastive batch.

    The loss contrasts the rows of one forward pass, gathered over processes: `per_device_train_batch_size ×
    world_size` pairs. Gradient accumulation sums the gradients of several such batches; it adds no negatives.
    """
    if len(train_dataset) == 0:
        raise ValueError(
            "The training split is empty (0 rows): there is nothing to train on. Check the split name, the filters "
            "applied to it and --num_shots."
        )
    contrastive = args.per_device_train_batch_size * args.world_size
    if contrastive < 2:
        raise ValueError(
            f"--per_device_train_batch_size {args.per_device_train_batch_size} on {args.world_size} process(es) "
            "gives a contrastive batch of one image-text pair: it has no negatives and its loss is 0. Use a batch of "
            "at least 2 (the paper uses 64)."
        )
    if args.gradient_accumulation_steps > 1:
        logger.warning_once(
            f"gradient_accumulation_steps={args.gradient_accumulation_steps}: each optimiser step averages "
            f"{args.gradient_accumulation_steps} batches, but the contrastive loss still sees {contrastive} pairs "
            f"per batch (per_device_train_batch_size {args.per_device_train_batch_size} x {args.world_size} "
            "process(es)), so the negatives per step do not grow. For more negatives raise the per-device batch "
            "(--contrastive_chunk_size N keeps its memory at N pairs) or the number of processes."
        )


def decay_parameter_names(trainer: Trainer, model: torch.nn.Module) -> list[str]:
    """The parameters `trainer` applies weight decay to: every one with `args.weight_decay_all_parameters` (the MMFT
    reference), else `transformers.Trainer`'s choice (biases and LayerNorm weights exempt)."""
    if trainer.args.weight_decay_all_parameters:
        return [name for name, _ in model.named_parameters()]
    return Trainer.get_decay_parameter_names(trainer, model)


class MMFTTrainer(Trainer):
    """Fine-tunes a CLIP-style dual encoder with `w * SupCon + (1 - w) * CLIP` on (image, caption) pairs.

    Training rows are `{image, label, captions}`; each fetch draws one caption at random and prefixes the class
    template (`MMFTDataCollator`). Under several processes the loss runs over the global batch: embeddings are
    all-gathered with gradient and labels gathered, so N processes × batch b train like one process with batch N·b.

    `evaluate()` rebuilds the class prototypes from the **current** text encoder (the normalised mean of the
    normalised embeddings of every training caption of a class) and reports `eval_accuracy`, `eval_balanced_accuracy`
    and one `eval_accuracy_<class>` per class, so `metric_for_best_model="accuracy"` selects the best epoch. Every
    checkpoint and the final output directory hold a standard model + processor, the class prototypes
    (`class_prototypes.safetensors`) and the label names (`config.id2label`). Evaluated splits are matched to the
    training classes by label **name** (`align_label_names`), never by position alone.

    Training rows are read in an `EpochSampler` order (seeded by `data_seed`, else `seed`, and the epoch; the
    `train_sampling_strategy` option does not apply) and each carries its `(epoch, row)` key, from which the collator
    draws the caption and the crop. A run resumed from a checkpoint therefore replays exactly the batches, texts and
    crops of the uninterrupted run, with any `dataloader_num_workers`.

    Args:
        model (`PreTrainedModel`):
            A dual encoder whose forward returns `image_embeds`/`text_embeds` (normalised) and which has
            `get_text_features`, `get_image_features` and `logit_scale` (`CLIPModel`, `VisionTextDualEncoderModel`).
        args (`MMFTTrainingArguments`): training arguments.
        train_dataset (`datasets.Dataset`): captioned training rows; the label column must be a `ClassLabel`.
        eval_dataset (`datasets.Dataset` or `dict[str, datasets.Dataset]`, *optional*): labelled evaluation rows
            (captions not needed).
        processing_class (`ProcessorMixin`): the model's processor (tokenizer + image processor); saved with
            every checkpoint.
        prototype_dataset (`datasets.Dataset`, *optional*): rows whose captions build the class prototypes;
            defaults to `train_dataset` (so validation captions are never used for the classifier).
        class_names (`Sequence[str]`, *optional*): class names; default from the `ClassLabel` feature.
        data_collator (*optional*): defaults to an `MMFTDataCollator` configured from `args`.
        **kwargs: passed to `transformers.Trainer` (callbacks, optimizers, ...).
    """

    # The loss is a per-batch mean: let Trainer divide it by the gradient-accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model=None,
        args: MMFTTrainingArguments | None = None,
        train_dataset: datasets.Dataset | None = None,
        eval_dataset: datasets.Dataset | dict[str, datasets.Dataset] | None = None,
        processing_class=None,
        prototype_dataset: datasets.Dataset | None = None,
        class_names: Sequence[str] | None = None,
        data_collator=None,
        **kwargs,
    ):
        if args is None:
            args = MMFTTrainingArguments(output_dir="mmft_output")
        if not isinstance(args, MMFTTrainingArguments):
            raise TypeError("MMFTTrainer needs MMFTTrainingArguments (it carries supcon_weight, column names, ...).")
        if processing_class is None:
            raise ValueError("Pass the model's processor as processing_class= (tokenizer and image processor).")
        source = train_dataset if train_dataset is not None else prototype_dataset
        if source is None:
            raise ValueError("MMFTTrainer needs a train_dataset (or a prototype_dataset for evaluation only).")
        if train_dataset is None and eval_dataset is None and args.eval_strategy != "no":
            # evaluation only: nothing to evaluate during training, so transformers' check does not apply
            args = dataclasses.replace(args, eval_strategy="no", load_best_model_at_end=None)
        if train_dataset is not None:
            check_contrastive_batch(args, train_dataset)
        require_captions = args.text_source == "captions"
        names = validate_captioned_dataset(
            source,
            image_column=args.image_column,
            label_column=args.label_column,
            caption_column=args.caption_column,
            require_captions=require_captions,
            class_names=class_names,
        )
        self.class_names = list(names)
        # evaluated splits are matched to training by these names (the label feature's), not by label position
        label_feature = source.features[args.label_column]
        self.label_feature_names = (
            list(label_feature.names) if isinstance(label_feature, datasets.ClassLabel) else None
        )
        # texts use the normalised names (method.md: lower case, "_"/"-" to spaces); labels keep the dataset's names
        self.text_class_names = [normalize_class_name(name) for name in self.class_names]
        train_dataset = with_row_errors(self._with_training_texts(train_dataset, args), args.image_column)
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                name: self._evaluation_rows(split, args, f"{name!r} evaluation")
                for name, split in eval_dataset.items()
            }
        else:
            eval_dataset = self._evaluation_rows(eval_dataset, args)
        if prototype_dataset is None:
            prototype_dataset = source
        elif require_captions:
            validate_captioned_dataset(
                prototype_dataset,
                image_column=args.image_column,
                label_column=args.label_column,
                caption_column=args.caption_column,
            )
        self.prototype_dataset = prototype_dataset
        if train_dataset is not None:
            self._warn_classes_without_rows(train_dataset, args)
        if data_collator is None:
            data_collator = MMFTDataCollator(
                processor=processing_class,
                class_names=self.text_class_names,
                # other text sources' rows already hold their full texts (`with_template_captions`): no prefix
                class_template=args.class_template if require_captions else None,
                image_column=args.image_column,
                label_column=args.label_column,
                caption_column=args.caption_column,
                caption_sampling=args.caption_sampling if require_captions else "caption",
                template_probability=args.template_probability if require_captions else 0.0,
                crop_scale=(args.crop_scale_min, 1.0),
                seed=args.seed,
                index_column=ROW_INDEX_COLUMN,
                padding=True if model is None else text_padding(model),
                # the text tower's positions bound it too (a SigLIP with 64 positions and a 77-token tokenizer)
                max_length=None if model is None else max_text_length(model, processing_class.tokenizer),
            )
        self._eval_collator = MMFTDataCollator(
            processor=processing_class,
            class_names=self.text_class_names,
            image_column=args.image_column,
            label_column=args.label_column,
            caption_column=None,
            train=False,
            index_column=ROW_INDEX_COLUMN,
        )
        if model is not None:
            self._set_label_names(model)
            if args.use_lora:
                model = self._wrap_lora(model, args)
        self._caption_texts: list[list[str]] | None = None
        self._prototypes: torch.Tensor | None = None
        self._prototypes_key: tuple | None = None
        self.per_class_accuracy: dict[str, float] = {}
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )

    # ---- set-up ----

    def _evaluation_rows(self, dataset, args: MMFTTrainingArguments, split_name: str = "evaluation"):
        """An evaluated split with its labels matched to the training classes by name, images decoded late."""
        if isinstance(dataset, datasets.Dataset):
            reference = self.label_feature_names if self.label_feature_names is not None else self.class_names
            dataset = align_label_names(dataset, reference, args.label_column, split_name)
        return with_row_errors(dataset, args.image_column)

    def _warn_classes_without_rows(self, train_dataset: datasets.Dataset, args: MMFTTrainingArguments) -> None:
        """Names the classes that have no training image (they are never trained on) and their prototypes' source."""
        counts = Counter(train_dataset[args.label_column])
        missing = [name for label, name in enumerate(self.class_names) if not counts[label]]
        if not missing:
            return
        if args.prototype_source != "captions":
            source = f"the {args.prototype_source!r} class-name templates"
        else:
            prototype_counts = Counter(self.prototype_dataset[args.label_column])
            without = [name for label, name in enumerate(self.class_names) if not prototype_counts[label]]
            source = (
                f"the fallback template {args.fallback_template!r} (no captions)"
                if without == missing
                else "the prototype_dataset's captions where it has any, else the fallback template "
                f"{args.fallback_template!r}"
            )
        logger.warning(
            f"{len(missing)} of {len(self.class_names)} classes have no training image: {missing}. They are not "
            f"trained on, and their class prototypes come from {source}. Check the split (and --num_shots)."
        )

    def _with_training_texts(self, dataset, args: MMFTTrainingArguments):
        """FLYP (`class_name`) trains on the class template alone; FLYP-ens on one of the 80 templates per fetch."""
        if dataset is None or args.text_source == "captions":
            return dataset
        templates = (args.class_template or "a photo of a {}.",)
        if args.text_source == "templates":
            templates = OPENAI_IMAGENET_TEMPLATES
        return with_template_captions(
            dataset, self.text_class_names, templates, args.label_column, args.caption_column
        )

    def _set_label_names(self, model) -> None:
        config = _unwrap_peft(model).config
        config.id2label = dict(enumerate(self.class_names))
        config.label2id = {name: index for index, name in enumerate(self.class_names)}

    @staticmethod
    def _wrap_lora(model, args: MMFTTrainingArguments):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=list(args.lora_target_modules),
        )
        with warnings.catch_warnings():  # peft reads the deprecated `is_gradient_checkpointing` of transformers 5
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, config)
        for name in ("logit_scale", "logit_bias"):  # peft freezes them; the method trains the temperature
            parameter = getattr(_unwrap_peft(model), name, None)
            if isinstance(parameter, torch.nn.Parameter):
                parameter.requires_grad_(True)
        return model

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        return decay_parameter_names(self, model)

    # ---- training data: per-sample keys for exact resume ----

    def _get_train_sampler(self, train_dataset=None) -> torch.utils.data.Sampler | None:
        """An `EpochSampler` seeded by `data_seed` (else `seed`): the same order per epoch in every process and
        after a resume, with the epoch attached to each index for the collator's per-sample draws."""
        train_dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not isinstance(train_dataset, EpochKeyedDataset):
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return EpochSampler(len(train_dataset), seed)

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """Trainer's DataLoader over `EpochKeyedDataset(train_dataset)`: every row carries `(epoch, row index)`,
        from which `MMFTDataCollator` draws its caption and crop, so that a resumed run replays the same draws."""
        if not isinstance(self.train_dataset, datasets.Dataset):
            return super().get_train_dataloader()
        return self._get_dataloader(
            dataset=EpochKeyedDataset(self.train_dataset),
            description="Training",
            batch_size=self._train_batch_size,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    # ---- loss ----

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        """`mmft_loss` over the global batch (embeddings gathered with gradient when distributed), in fp32."""
        labels = inputs.pop("labels")
        outputs = model(**inputs, return_dict=True)
        base = _unwrap_peft(self.accelerator.unwrap_model(model))
        if getattr(base, "logit_scale", None) is not None:
            loss = self._global_loss(base, outputs.image_embeds, outputs.text_embeds, labels)
        elif self.args.world_size == 1:  # a dual encoder without a logit scale: use its own logits
            loss = mmft_loss(
                outputs.logits_per_image, outputs.logits_per_text, labels, supcon_weight=self.args.supcon_weight
            )
        else:
            raise ValueError("Distributed MMFT training needs a model with a `logit_scale` parameter.")
        if return_outputs:
            return loss, {"image_embeds": outputs.image_embeds, "text_embeds": outputs.text_embeds}
        return loss

    def _global_loss(self, base, image_embeds, text_embeds, labels) -> torch.Tensor:
        """`mmft_loss` of the gathered embeddings with `base`'s `logit_scale` (and `logit_bias`): in float32 under AMP
        (bf16/fp16 embeddings are widened), in float64 for a float64 model."""
        image_embeds, text_embeds, labels = gather_batch(image_embeds, text_embeds, labels)
        dtype = torch.promote_types(image_embeds.dtype, torch.float32)
        with torch.autocast(device_type=image_embeds.device.type, enabled=False):
            logits_per_image, logits_per_text = global_logits(
                image_embeds.to(dtype),
                text_embeds.to(dtype),
                base.logit_scale.to(dtype).exp(),
                getattr(base, "logit_bias", None),
            )
            return mmft_loss(logits_per_image, logits_per_text, labels, supcon_weight=self.args.supcon_weight)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Trainer's step, or with `args.contrastive_chunk_size` below `per_device_train_batch_size` a gradient-cached one.

        The gradient-cached step (GradCache, `training/grad_cache.py`) embeds the batch in chunks without the graph,
        computes the loss over the whole global batch and its gradient with respect to the embeddings, then embeds
        each chunk again with the graph (same dropout masks) and back-propagates the cached gradients. The parameter
        gradients, the returned loss and the gradient-accumulation division equal `Trainer.training_step`'s.
        """
        chunk_size = self.args.contrastive_chunk_size
        # decided by the configured batch, not this batch's size: every process runs the same collectives
        if chunk_size is None or self.args.per_device_train_batch_size <= chunk_size:
            return super().training_step(model, inputs, num_items_in_batch)
        return self._gradient_cached_step(model, inputs, chunk_size)

    def _gradient_cached_step(self, model, inputs: dict, chunk_size: int) -> torch.Tensor:
        unwrapped = self.accelerator.unwrap_model(model)  # the model without DDP, keeping accelerate's autocast
        base = _unwrap_peft(unwrapped)
        if getattr(base, "logit_scale", None) is None:
            raise ValueError("--contrastive_chunk_size needs a dual encoder with a `logit_scale` parameter.")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("--contrastive_chunk_size works with one process or DDP, not with DeepSpeed or FSDP.")
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        labels = inputs.pop("labels")
        chunks = split_rows(inputs, chunk_size)
        # 1. embeddings without the graph, through the unwrapped model: no DDP collective per chunk, so processes
        # may hold different numbers of chunks
        states, image_chunks, text_chunks = [], [], []
        with torch.no_grad():
            for chunk in chunks:
                states.append(RandomState.capture(self.args.device))
                with self.compute_loss_context_manager():
                    outputs = unwrapped(**chunk, return_dict=True)
                image_chunks.append(outputs.image_embeds)
                text_chunks.append(outputs.text_embeds)
        # 2. the loss over the global batch and its gradient with respect to the embeddings and the scale parameters
        image_embeds = torch.cat(image_chunks).requires_grad_(True)
        text_embeds = torch.cat(text_chunks).requires_grad_(True)
        scale_parameters = [
            parameter
            for parameter in (base.logit_scale, getattr(base, "logit_bias", None))
            if isinstance(parameter, torch.nn.Parameter) and parameter.requires_grad
        ]
        loss = self._global_loss(base, image_embeds, text_embeds, labels) / self.current_gradient_accumulation_steps
        image_grads, text_grads, *scale_grads = torch.autograd.grad(
            loss, [image_embeds, text_embeds, *scale_parameters]
        )
        sizes = [len(chunk) for chunk in image_chunks]
        # 3. each chunk again with the graph and the same random draws; the last one through the wrapped model, whose
        # backward makes DDP all-reduce the gradients summed over the chunks (and the scale parameters' own)
        for index, (chunk, state, image_grad, text_grad) in enumerate(
            zip(chunks, states, image_grads.split(sizes), text_grads.split(sizes), strict=True)
        ):
            last = index == len(chunks) - 1
            with state.replay(), self.compute_loss_context_manager():
                outputs = (model if last else unwrapped)(**chunk, return_dict=True)
                tensors, gradients = [outputs.image_embeds, outputs.text_embeds], [image_grad, text_grad]
                if last:
                    tensors, gradients = tensors + scale_parameters, gradients + scale_grads
                objective = cached_gradient_objective(tensors, gradients)
            self.accelerator.backward(objective)  # loss scaling (fp16) as Trainer.training_step applies it
        return loss.detach()

    # ---- class prototypes and evaluation ----

    def prototype_texts(self, source: str | None = None) -> list[list[str]]:
        """The texts averaged into each class prototype for `source` (defaults to `args.prototype_source`)."""
        source = source or self.args.prototype_source
        if source == "single_template":
            return template_texts(self.text_class_names, SINGLE_TEMPLATE)
        if source == "ensemble":
            return template_texts(self.text_class_names, OPENAI_IMAGENET_TEMPLATES)
        if self._caption_texts is None:  # the captions never change: read them once, re-encode at each evaluation
            dataset = self.prototype_dataset
            self._caption_texts = class_texts_from_captions(
                list(dataset[self.args.caption_column]),
                list(dataset[self.args.label_column]),
                self.text_class_names,
                class_template=self.args.class_template,
                fallback_template=self.args.fallback_template,
                caption_sampling=self.args.caption_sampling,
            )
        return self._caption_texts

    def compute_class_prototypes(self, source: str | None = None) -> torch.Tensor:
        """Encodes the prototype texts with the current text encoder: `[num_classes, dim]`, unit rows."""
        source = source or self.args.prototype_source
        model = _unwrap_peft(self.accelerator.unwrap_model(self.model))
        prototypes = build_class_prototypes(
            model, self.processing_class.tokenizer, self.prototype_texts(source), self.args.prototype_batch_size
        )
        self._prototypes, self._prototypes_key = prototypes, (source, self.state.global_step)
        return prototypes

    def _prototypes_for_saving(self) -> torch.Tensor:
        """Reuses the prototypes of an evaluation at this very step (weights unchanged since), else rebuilds."""
        if self._prototypes is not None and self._prototypes_key == (
            self.args.prototype_source,
            self.state.global_step,
        ):
            return self._prototypes
        return self.compute_class_prototypes()

    def _eval_collate(self, rows: list[dict]) -> dict:
        batch = self._eval_collator(rows)
        return {key: value for key, value in batch.items() if key not in ("input_ids", "attention_mask")}

    def evaluate(
        self,
        eval_dataset: datasets.Dataset | dict[str, datasets.Dataset] | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
        prototype_source: str | None = None,
    ) -> dict[str, float]:
        """Classifies `eval_dataset` with class prototypes built from the current text encoder.

        Args:
            eval_dataset (`datasets.Dataset` or `dict`, *optional*): defaults to the trainer's `eval_dataset`.
            ignore_keys: unused, kept for the `Trainer.evaluate` signature.
            metric_key_prefix (`str`, defaults to `"eval"`): prefix of the metric names.
            prototype_source (`str`, *optional*): `"captions"`, `"single_template"` or `"ensemble"`; defaults to
                `args.prototype_source`. Use the template sources for zero-shot baselines.

        Returns:
            `dict[str, float]` with `{prefix}_accuracy`, `{prefix}_balanced_accuracy`, `{prefix}_accuracy_<class>`,
            `{prefix}_samples`, runtime and the epoch.
        """
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset (passed here or to the trainer).")
        if isinstance(dataset, dict):
            metrics = {}
            for name, split in dataset.items():
                metrics.update(self.evaluate(split, ignore_keys, f"{metric_key_prefix}_{name}", prototype_source))
            return metrics
        dataset = self._evaluation_rows(dataset, self.args, metric_key_prefix)
        start = time.time()
        prototypes = self.compute_class_prototypes(prototype_source)
        model = _unwrap_peft(self.accelerator.unwrap_model(self.model))
        was_training = model.training
        model.eval()
        loader = self.accelerator.prepare(
            torch.utils.data.DataLoader(
                dataset,
                batch_size=self.args.per_device_eval_batch_size,
                collate_fn=self._eval_collate,
                num_workers=self.args.dataloader_num_workers,
                pin_memory=self.args.dataloader_pin_memory,
                prefetch_factor=self.args.dataloader_prefetch_factor,
            )
        )
        predictions, references = [], []
        try:
            with torch.no_grad():
                for batch in loader:
                    image_inputs = {key: value for key, value in batch.items() if key != "labels"}
                    features = model.get_image_features(**image_inputs)  # SigLIP 2: with mask and shapes
                    features = pooled_output(features).float()
                    scores = torch.nn.functional.normalize(features, dim=-1) @ prototypes.T
                    gathered = self.accelerator.gather_for_metrics((scores.argmax(-1), batch["labels"]))
                    predictions.append(gathered[0].cpu())
                    references.append(gathered[1].cpu())
        finally:
            model.train(was_training)
        metrics = self._accuracy_metrics(torch.cat(predictions), torch.cat(references), metric_key_prefix)
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 4)
        if self.state.epoch is not None:
            metrics["epoch"] = self.state.epoch
        # one line per evaluation: the per-class accuracies stay in the returned metrics and the model card
        self.log(
            {key: value for key, value in metrics.items() if not key.startswith(f"{metric_key_prefix}_accuracy_")}
        )
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _accuracy_metrics(self, predictions: torch.Tensor, references: torch.Tensor, prefix: str) -> dict:
        correct = predictions == references
        per_class = {}
        for index, name in enumerate(self.class_names):
            mask = references == index
            if mask.any():
                per_class[name] = correct[mask].float().mean().item()
        self.per_class_accuracy = per_class
        metrics = {
            f"{prefix}_accuracy": correct.float().mean().item(),
            f"{prefix}_balanced_accuracy": sum(per_class.values()) / max(len(per_class), 1),
            f"{prefix}_samples": int(references.numel()),
        }
        metrics.update({f"{prefix}_accuracy_{name}": value for name, value in per_class.items()})
        return metrics

    # ---- saving and loading ----

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Saves the model and processor, plus the class prototypes and (LoRA) the trained logit scale."""
        output_dir = output_dir or self.args.output_dir
        with _without_weight_writing_bars():  # one "Writing model shards" bar per checkpoint would bury the log
            super()._save(output_dir, state_dict=state_dict)
        prototypes = self._prototypes_for_saving()
        if not self.args.should_save:
            return
        save_class_prototypes(prototypes, self.class_names, output_dir, metadata=self._prototype_metadata())
        self._save_extra_parameters(output_dir)

    def _prototype_metadata(self) -> dict:
        """What the saved prototypes were built from (read back by the pipeline to embed texts the same way)."""
        return {
            "source": self.args.prototype_source,
            "class_template": self.args.class_template,
            "caption_sampling": self.args.caption_sampling,
        }

    def _save_extra_parameters(self, output_dir: str) -> None:
        """Beside a LoRA adapter: the trained `logit_scale` (and `logit_bias`), which peft does not save."""
        base = _unwrap_peft(self.accelerator.unwrap_model(self.model))
        if base is self.accelerator.unwrap_model(self.model):  # a full model saves them itself
            return
        extras = {
            name: getattr(base, name).detach().cpu().reshape(-1).clone()
            for name in ("logit_scale", "logit_bias")
            if isinstance(getattr(base, name, None), torch.nn.Parameter)
        }
        save_file(extras, os.path.join(output_dir, EXTRA_PARAMETERS_FILENAME))

    def _restore_extra_parameters(self, checkpoint_dir: str) -> None:
        path = os.path.join(checkpoint_dir, EXTRA_PARAMETERS_FILENAME)
        if not os.path.isfile(path):
            return
        self._prototypes = None  # the weights changed under the same global step
        base = _unwrap_peft(self.accelerator.unwrap_model(self.model))
        with torch.no_grad():
            for name, value in load_file(path).items():
                parameter = getattr(base, name)
                parameter.copy_(value.reshape(parameter.shape).to(parameter.device, parameter.dtype))

    def _load_best_model(self) -> None:
        super()._load_best_model()
        self._prototypes = None
        self._restore_extra_parameters(self.state.best_model_checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        self._prototypes = None
        self._restore_extra_parameters(resume_from_checkpoint)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Saves the final output directory, or a checkpoint (Trainer's internal calls to `checkpoint-*`).

        The final directory always holds a plain model loadable with `CLIPModel.from_pretrained` (LoRA adapters
        merged; the adapter itself goes to `adapter/`), the processor, the class prototypes and a model card.
        `Trainer.push_to_hub` saves through here too, so a push uploads the merged model.
        """
        output_dir = output_dir or self.args.output_dir
        final = not _internal_call or os.path.abspath(output_dir) == os.path.abspath(self.args.output_dir)
        unwrapped = self.accelerator.unwrap_model(self.model)
        if not final or _unwrap_peft(unwrapped) is unwrapped:
            super().save_model(output_dir, _internal_call=_internal_call)
        else:
            prototypes = self._prototypes_for_saving()
            if self.args.should_save:
                with _without_weight_writing_bars():
                    unwrapped.save_pretrained(os.path.join(output_dir, "adapter"))
                    self._save_extra_parameters(os.path.join(output_dir, "adapter"))
                    save_for_hub(
                        unwrapped,
                        self.processing_class,
                        prototypes,
                        self.class_names,
                        output_dir,
                        remote_code=False,
                        prototype_metadata=self._prototype_metadata(),
                    )
                torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
            if self.args.push_to_hub and not _internal_call:
                self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
        if not _internal_call and self.args.should_save:
            self.create_model_card(output_dir=output_dir)

    def model_card_data(self, **overrides) -> MMFTModelCardData:
        """What this run knows for the model card; `overrides` set any `MMFTModelCardData` field."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        base = _unwrap_peft(unwrapped)
        accuracies = [entry for entry in self.state.log_history if any(k.endswith("_accuracy") for k in entry)]
        last = accuracies[-1] if accuracies else {}
        prefix = next((k[: -len("_accuracy")] for k in last if k.endswith("_accuracy") and "balanced" not in k), None)
        args = self.args
        lora = None
        if base is not unwrapped:
            lora = {"r": args.lora_r, "lora_alpha": args.lora_alpha, "target_modules": list(args.lora_target_modules)}
            lora["merged"] = True
        data = {
            "model_name": os.path.basename(os.path.normpath(args.output_dir)),
            "base_model": getattr(base.config, "_name_or_path", None) or None,
            "model_class": type(base).__name__,
            "supcon_weight": args.supcon_weight,
            "seed": args.seed,
            "hyperparameters": {
                "learning_rate": args.learning_rate,
                "weight_decay": args.weight_decay,
                "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
                "num_train_epochs": args.num_train_epochs,
                "contrastive_batch_size (pairs per loss)": args.per_device_train_batch_size * args.world_size,
                "optimizer_batch_size (pairs per update)": (
                    args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
                ),
                "class_template": args.class_template,
                "text_source": args.text_source,
                "caption_sampling": args.caption_sampling,
                "template_probability": args.template_probability,
                "prototype_source": args.prototype_source,
            },
            "eval_accuracy": last.get(f"{prefix}_accuracy") if prefix else None,
            "eval_split": {"eval": "validation"}.get(prefix, prefix.removeprefix("eval_")) if prefix else "validation",
            "per_class_accuracy": dict(self.per_class_accuracy),
            "labels": list(self.class_names),
            "lora": lora,
            "remote_code": False,
            "prototype_source": args.prototype_source,
        }
        provenance = (
            caption_provenance(self.prototype_dataset, args.caption_column) if args.text_source == "captions" else None
        )
        if provenance:
            models = [c.get("model") if isinstance(c, dict) else str(c) for c in provenance_captioners(provenance)]
            data["captioner"] = ", ".join(str(model) for model in models if model) or None  # several: each
            data["caption_prompt"] = provenance.get("prompt_template")
            data["caption_types"] = list(provenance.get("caption_types") or [])
            data["domain"] = provenance.get("domain")
        data.update(overrides)
        return MMFTModelCardData(**data)

    def create_model_card(
        self,
        model_name: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        finetuned_from: str | None = None,
        dataset: str | list[str] | None = None,
        output_dir: str | None = None,
        **overrides,
    ) -> None:
        """Writes `README.md` (and a per-class accuracy chart) into the output directory from this run.

        Takes `Trainer.create_model_card`'s main arguments (so `Trainer.push_to_hub` puts this card in every push)
        plus any `MMFTModelCardData` field as a keyword (e.g. `num_shots=16`, `captioner="gemini-2.5-flash-lite"`).
        The card goes to `output_dir` (defaults to `args.output_dir`).
        """
        standard = {
            "model_name": model_name,
            "license": license,
            "tags": [tags] if isinstance(tags, str) else tags,
            "base_model": finetuned_from,
            "dataset_id": dataset[0] if isinstance(dataset, list) else dataset,
        }
        overrides = {**{k: v for k, v in standard.items() if v is not None}, **overrides}
        overrides = {k: v for k, v in overrides.items() if k in MMFTModelCardData.__dataclass_fields__}
        create_model_card(self.model_card_data(**overrides), output_dir or self.args.output_dir)
