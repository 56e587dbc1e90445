"""The `"mmft-classification"` pipeline, registered with transformers when this module is imported.

```python
import mmft_hf  # registers the task
from transformers import pipeline

classifier = pipeline("mmft-classification", model="outputs/dtd-16shot")  # reads class_prototypes.safetensors
classifier("cat.jpg", top_k=3)  # [{"label": ..., "score": ...}, ...]

# plain zero-shot CLIP from class names, one template or OpenAI's 80-template ensemble
zero_shot = pipeline("mmft-classification", model=clip_dir, class_names=["cat", "dog"], templates="ensemble")
```

The class extends the self-contained `mmft_hf.classification.remote_pipeline.MMFTClassificationPipeline` (the file published for
`trust_remote_code=True`) with zero-shot prototypes built by `mmft_hf.classification.prototypes`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoModel
from transformers.pipelines import PIPELINE_REGISTRY

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
        class_names (`Sequence[str]`, *optional*): build zero-shot prototypes from these names instead.
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
        self._zero_shot_request = (None if class_names is None else list(class_names), resolve_templates(templates))
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


PIPELINE_REGISTRY.register_pipeline(
    TASK, pipeline_class=MMFTClassificationPipeline, pt_model=AutoModel, type="multimodal"
)
