"""Publishing a trained classifier: a directory (or Hub repository) that loads with `pipeline(...)`.

`save_for_hub` writes the model (LoRA merged by default), its processor, the class prototypes, the self-contained
pipeline code (`remote_pipeline.py` + `config.custom_pipelines`) and optionally the model card; `publish` does
the same into a temporary directory and uploads it with one commit.

Two ways to load the result:

- anyone: `pipeline(model=repo_or_dir, trust_remote_code=True)` (no mmft_hf needed);
- with mmft_hf: `pipeline("mmft-classification", model=repo_or_dir)`, no remote code (the config lists the remote
  copy under another task name, `remote_pipeline.REMOTE_TASK`, so transformers does not ask for `trust_remote_code`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Sequence

import torch
from huggingface_hub import HfApi

from .classification.pipeline import MMFTClassificationPipeline
from .classification.prototypes import model_device, save_class_prototypes
from .model_card import PROTOTYPE_DESCRIPTIONS, create_model_card

logger = logging.getLogger(__name__)


def is_peft_model(model) -> bool:
    """True for a peft `PeftModel` (checked without importing peft when it is not installed)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _processor_kwargs(processor) -> dict:
    """A `CLIPProcessor`-like processor goes in as `processor=`, a bare image processor as `image_processor=`."""
    if hasattr(processor, "image_processor"):
        return {"processor": processor}
    return {"image_processor": processor}


def _card_for_saved(card_data, adapter_only: bool, peft: bool, remote_code: bool, prototype_metadata: dict):
    """`card_data` made to describe what was saved: remote code, LoRA merged or not, how prototypes were built."""
    changes = {"remote_code": remote_code}
    if peft:
        changes["lora"] = {**(card_data.lora or {}), "merged": not adapter_only}
    source = prototype_metadata.get("source")
    if card_data.prototype_source is None and source in PROTOTYPE_DESCRIPTIONS:
        changes["prototype_source"] = source
    return dataclasses.replace(card_data, **changes)


def save_for_hub(
    model: torch.nn.Module,
    processor,
    class_prototypes: torch.Tensor,
    labels: Sequence[str],
    output_dir: str | os.PathLike,
    *,
    merge_lora: bool = True,
    remote_code: bool | None = None,
    prototype_metadata: dict | None = None,
    card_data=None,
    max_shard_size: str | int = "5GB",
) -> str:
    """Writes a classifier directory ready for `pipeline(...)` and the Hub.

    Args:
        model (`torch.nn.Module`): a `CLIPModel`-like dual encoder, or a peft `PeftModel` around one.
        processor: its `CLIPProcessor` (or image processor; the tokenizer is then not saved).
        class_prototypes (`torch.Tensor`): `[num_classes, dim]` class embeddings built with this model.
        labels (`Sequence[str]`): the class names in row order.
        output_dir (`str` or `os.PathLike`): created if missing.
        merge_lora (`bool`, defaults to `True`): for a `PeftModel`, save a merged plain checkpoint (a copy is
            merged; `model` is left unchanged). `False` saves the adapter only (`adapter_config.json` +
            `adapter_model.safetensors`, loaded with `PeftModel.from_pretrained(base, output_dir)`); the base
            model's `logit_scale` then applies, since peft does not save a bare parameter (this changes the
            score temperature, not the ranking).
        remote_code (`bool`, *optional*): write `remote_pipeline.py` and `config.custom_pipelines` so that
            `pipeline(model=output_dir, trust_remote_code=True)` works without mmft_hf. Defaults to `True` for full
            checkpoints; adapter-only directories cannot carry it (their config is the base model's).
        prototype_metadata (`dict`, *optional*): JSON facts stored with the prototypes (e.g. how they were built:
            `{"source": "captions"}`, as the trainer writes).
        card_data (`MMFTModelCardData`, *optional*): when given, also writes `README.md` (and the accuracy chart).
            The card is made to match what is saved: its `remote_code`, `lora["merged"]` (for a `PeftModel`) and,
            when unset, `prototype_source` (from `prototype_metadata["source"]`) are filled in here.
        max_shard_size (`str` or `int`, defaults to `"5GB"`): passed to `save_pretrained`.

    Returns:
        `str`: `output_dir`.
    """
    output_dir = os.fspath(output_dir)
    peft = is_peft_model(model)
    adapter_only = peft and not merge_lora
    if remote_code is None:
        remote_code = not adapter_only
    if adapter_only and remote_code:
        raise ValueError(
            "An adapter-only directory cannot carry the remote pipeline (it has no config of its own); use "
            "merge_lora=True, or remote_code=False."
        )
    if len(labels) != class_prototypes.shape[0]:
        raise ValueError(f"{class_prototypes.shape[0]} class prototypes but {len(labels)} labels.")
    prototype_metadata = dict(prototype_metadata or {})
    if adapter_only:
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
        save_class_prototypes(class_prototypes, labels, output_dir, {**prototype_metadata, "adapter_only": True})
    else:
        was_training = model.training
        try:  # building a pipeline puts the model in eval mode: give the caller's model back as it was
            pipe = MMFTClassificationPipeline(
                model=model,
                class_prototypes=class_prototypes,
                labels=list(labels),
                device=model_device(model),
                **_processor_kwargs(processor),
            )
            pipe.prototype_metadata = prototype_metadata
            # a PeftModel is merged (from a copy) by the pipeline's save_pretrained
            pipe.save_pretrained(output_dir, remote_code=remote_code, max_shard_size=max_shard_size)
        finally:
            model.train(was_training)
    if card_data is not None:
        create_model_card(_card_for_saved(card_data, adapter_only, peft, remote_code, prototype_metadata), output_dir)
    return output_dir


def publish(
    model: torch.nn.Module,
    processor,
    class_prototypes: torch.Tensor,
    labels: Sequence[str],
    repo_id: str,
    *,
    merge_lora: bool = True,
    remote_code: bool | None = None,
    prototype_metadata: dict | None = None,
    card_data=None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload MMFT classifier",
    revision: str | None = None,
    max_shard_size: str | int = "5GB",
):
    """`save_for_hub` into a temporary directory, then one upload to `repo_id` (created if missing).

    Unlike `pipe.push_to_hub`, which replaces `README.md` with a generic card, this uploads the MMFT model card
    when `card_data` is given. Arguments are those of `save_for_hub`, plus `private`, `token`, `commit_message`
    and `revision` (a branch, created from the default branch when it does not exist yet) for the Hub.

    Returns:
        `huggingface_hub.CommitInfo` of the upload.
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        save_for_hub(
            model,
            processor,
            class_prototypes,
            labels,
            folder,
            merge_lora=merge_lora,
            remote_code=remote_code,
            prototype_metadata=prototype_metadata,
            card_data=card_data,
            max_shard_size=max_shard_size,
        )
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision)
