"""The `"mmft-classification"` pipeline, registered with transformers when this module is imported.

```python
import mmft_hf  # registers the task
from transformers import pipeline

classifier = pipeline("mmft-classification", model="outputs/dtd-16shot")  # reads class_prototypes.safetensors
classifier("cat.jpg", top_k=3)  # [{"label": ..., "score": ...}, ...]
classifier("cat.jpg", function_to_apply="sigmoid")  # per-class scores (SigLIP's probabilities); "none": logits

# plain zero-shot CLIP from class names, one template or OpenAI's 80-template ensemble
zero_shot = pipeline("mmft-classification", model=clip_dir, class_names=["cat", "dog"], templates="ensemble")
```

The class extends the self-contained `mmft_hf.classification.remote_pipeline.MMFTClassificationPipeline` (the file published for
`trust_remote_code=True`) with zero-shot prototypes built by `mmft_hf.classification.prototypes`.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Sequence

import torch
from huggingface_hub import HfApi
from transformers import AutoModel
from transformers.pipelines import PIPELINE_REGISTRY

from ..model_card import PROTOTYPE_DESCRIPTIONS, MMFTModelCardData, create_model_card
from . import remote_pipeline
from .prototypes import SINGLE_TEMPLATE, TEMPLATE_PRESETS, zero_shot_prototypes

TASK = remote_pipeline.TASK


def resolve_templates(templates: str | Sequence[str] | None) -> tuple[str, ...]:
    """`None`/`"single"` -> `("a photo of a {}",)`; `"ensemble"` -> the 80 OpenAI templates; else the given ones.

    A single string containing `{}` is one template. Every template must contain `{}` (the class name's place).
    """
    if templates is None:
        return SINGLE_TEMPLATE
    if isinstance(templates, str):
        if templates in TEMPLATE_PRESETS:
            return TEMPLATE_PRESETS[templates]
        templates = (templates,)
    templates = tuple(templates)
    if not templates:
        raise ValueError("`templates` is empty; pass 'single', 'ensemble' or a list of templates containing '{}'.")
    invalid = [template for template in templates if not isinstance(template, str) or "{}" not in template]
    if invalid:
        raise ValueError(
            f"Templates {invalid} have no '{{}}' placeholder for the class name; use e.g. 'a photo of a {{}}.' or "
            f"one of the presets {sorted(TEMPLATE_PRESETS)}."
        )
    return templates


class MMFTClassificationPipeline(remote_pipeline.MMFTClassificationPipeline):
    """Image classification with class prototypes (`"mmft-classification"`).

    Prototypes come, in this order, from `class_prototypes=` + `labels=`, from `class_names=` (+ `templates=`,
    zero-shot CLIP), or from `class_prototypes.safetensors` next to the model. They are built or loaded once.

    Args:
        model: a dual encoder with `get_image_features` and `logit_scale` (e.g. `CLIPModel`, or a peft
            `PeftModel` around one).
        image_processor: the model's image processor (or pass `processor=` with a `CLIPProcessor`).
        tokenizer: the model's tokenizer; needed only with `class_names`.
        class_prototypes (`torch.Tensor`, *optional*): `[num_classes, dim]` class embeddings.
        labels (`Sequence[str]`, *optional*): class names in row order, required with `class_prototypes`.
        class_names (`Sequence[str]` or `str`, *optional*): build zero-shot prototypes from these names instead
            (a single string is one class, as transformers' `candidate_labels`, never one class per character).
        templates (`str` or `Sequence[str]`, *optional*, defaults to `"single"`): with `class_names`: `"single"`
            (`"a photo of a {}"`), `"ensemble"` (OpenAI's 80 ImageNet templates) or your own templates with `{}`.
        top_k (`int`, *optional*, defaults to 5): labels returned per image, clamped to the number of classes.
        dtype / torch_dtype (`torch.dtype` or `str`, *optional*): cast the model to this dtype.
        local_files_only (`bool`, *optional*, defaults to `False`): read the prototypes file from the local cache
            only (see the parent class for what `pipeline()` does not pass on).
        device, batch_size: as for every pipeline.
    """

    def __init__(
        self,
        *args,
        class_names: Sequence[str] | None = None,
        templates: str | Sequence[str] | None = None,
        **kwargs,
    ):
        if templates is not None and class_names is None:
            raise ValueError("`templates` only applies with `class_names=[...]` (zero-shot prototypes).")
        if isinstance(class_names, str):
            class_names = [class_names]
        if class_names is not None:
            class_names = list(class_names)
            invalid = [name for name in class_names if not isinstance(name, str) or not name.strip()]
            if invalid:
                raise ValueError(f"`class_names` must be non-empty strings; got {invalid}.")
        self._zero_shot_request = (class_names, resolve_templates(templates))
        super().__init__(*args, **kwargs)

    def _resolve_prototypes(
        self, class_prototypes: torch.Tensor | None, labels: Sequence[str] | None
    ) -> tuple[torch.Tensor, list[str], dict]:
        class_names, templates = self._zero_shot_request
        if class_names is None:
            return super()._resolve_prototypes(class_prototypes, labels)
        if class_prototypes is not None or labels is not None:
            raise ValueError("Pass either `class_names` (zero-shot) or `class_prototypes` + `labels`, not both.")
        if not class_names:
            raise ValueError("`class_names` is empty; pass at least one class name.")
        if self.tokenizer is None:
            raise ValueError("Zero-shot prototypes from `class_names` need the model's tokenizer: pass `tokenizer=`.")
        prototypes = zero_shot_prototypes(self.model, self.tokenizer, class_names, templates)
        metadata = {"source": "zero-shot", "templates": list(templates)}
        return prototypes, class_names, metadata

    # ------------------------------------------------------------------------------------------------- saving
    def model_card_data(self, **overrides) -> MMFTModelCardData:
        """What this pipeline knows for a model card: labels, base model (a Hub id, never a local path) and how
        the prototypes were built; `overrides` set any `MMFTModelCardData` field."""
        name = getattr(self.model.config, "_name_or_path", "") or ""
        base_model = None if not name or os.path.exists(name) or os.path.isabs(name) else name
        source = self.prototype_metadata.get("source")
        if source == "zero-shot":
            templates = tuple(self.prototype_metadata.get("templates", ()))
            source = {SINGLE_TEMPLATE: "single_template", TEMPLATE_PRESETS["ensemble"]: "ensemble"}.get(templates)
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        data = {
            "base_model": base_model,
            "model_class": type(model).__name__,
            "labels": list(self.labels),
            "prototype_source": source if source in PROTOTYPE_DESCRIPTIONS else None,
        }
        return MMFTModelCardData(**{**data, **overrides})

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        remote_code: bool = True,
        card_data: MMFTModelCardData | None = None,
        **kwargs,
    ) -> None:
        """Saves what the parent class saves (model, processor, class prototypes, pipeline code) and a model card.

        Args:
            save_directory (`str` or `os.PathLike`): the output directory (created if missing).
            remote_code (`bool`, defaults to `True`): see the parent class.
            card_data (`MMFTModelCardData`, *optional*): the card's facts; defaults to `self.model_card_data()`.
                Its `remote_code` is set to match what is saved. `README.md` is overwritten.
            kwargs: passed to `model.save_pretrained`.
        """
        super().save_pretrained(save_directory, remote_code=remote_code, **kwargs)
        card_data = self.model_card_data() if card_data is None else card_data
        create_model_card(dataclasses.replace(card_data, remote_code=remote_code), save_directory)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        remote_code: bool = True,
        card_data: MMFTModelCardData | None = None,
    ):
        """`save_pretrained` into a temporary directory (model card included) and one upload to `repo_id`.

        transformers' own `push_to_hub` replaces `README.md` with a generic card; this one uploads the MMFT card,
        whose usage snippets name `repo_id`. Arguments are those of `transformers`' `push_to_hub`, plus
        `remote_code` and `card_data` as in `save_pretrained`.

        Returns:
            `huggingface_hub.CommitInfo` of the upload.
        """
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        card_data = self.model_card_data() if card_data is None else card_data
        if card_data.model_id is None:
            card_data = dataclasses.replace(card_data, model_id=repo_id)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, remote_code=remote_code, card_data=card_data, max_shard_size=max_shard_size)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or "Upload MMFT classifier",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )


PIPELINE_REGISTRY.register_pipeline(
    TASK, pipeline_class=MMFTClassificationPipeline, pt_model=AutoModel, type="multimodal"
)
