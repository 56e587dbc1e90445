"""Class prototypes: class-averaged, L2-normalised text embeddings used as the classifier.

`w_c = normalize(mean_j normalize(f_T(t_j)))` over the texts `t_j` of class `c` (method.md §4). Prototypes are
stored next to a checkpoint as `class_prototypes.safetensors` (a `[num_classes, dim]` float32 tensor plus the label
names as JSON metadata), so a classifier loads without captions, a trainer or pickle.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..encoders import encode_texts, eval_mode, max_text_length, model_device, pooled_output  # noqa: F401
from .remote_pipeline import PROTOTYPES_FILENAME, read_prototypes_file, write_prototypes_file

# OpenAI CLIP's 80 ImageNet prompt templates (from the CLIP repository's zero-shot notebook, MIT licence).
OPENAI_IMAGENET_TEMPLATES = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)
SINGLE_TEMPLATE = ("a photo of a {}",)
# The named template sets: `templates="single"`/`"ensemble"` in the pipeline, `prototype_source="single_template"`/
# `"ensemble"` in training.
TEMPLATE_PRESETS = {"single": SINGLE_TEMPLATE, "ensemble": OPENAI_IMAGENET_TEMPLATES}


@torch.no_grad()
def build_class_prototypes(
    model: torch.nn.Module,
    tokenizer,
    class_texts: Sequence[Sequence[str]],
    batch_size: int = 256,
) -> torch.Tensor:
    """Averages the normalised text embeddings of each class and normalises the mean.

    Texts of all classes are encoded together in batches of `batch_size`, and each batch is added into running
    per-class sums, so memory is bounded by one batch whatever the number of captions. The model runs in eval
    mode (deterministic, e.g. right after training with LoRA dropout) and is given back in the mode it was in.

    Args:
        model (`torch.nn.Module`): a dual encoder with `get_text_features`.
        tokenizer: the model's tokenizer.
        class_texts (`Sequence[Sequence[str]]`): for each class index, its texts (at least one each).
        batch_size (`int`, defaults to 256): texts per forward pass.

    Returns:
        `torch.Tensor` of shape `[num_classes, dim]`, float32, rows of unit norm.
    """
    empty = [index for index, texts in enumerate(class_texts) if len(texts) == 0]
    if empty:
        raise ValueError(f"Classes {empty} have no texts; give each class at least one text (e.g. a template).")
    flat_texts = [text for texts in class_texts for text in texts]
    owners = torch.tensor([index for index, texts in enumerate(class_texts) for _ in texts])
    sums = None
    with eval_mode(model):
        for start in range(0, len(flat_texts), batch_size):
            embeddings = encode_texts(model, tokenizer, flat_texts[start : start + batch_size], batch_size)
            if sums is None:
                sums = torch.zeros(len(class_texts), embeddings.shape[-1], device=embeddings.device)
            sums.index_add_(0, owners[start : start + batch_size].to(embeddings.device), embeddings)
    return torch.nn.functional.normalize(sums, dim=-1)


def template_texts(class_names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """For each class, every template filled with its name (`"a photo of a {}"` -> `"a photo of a cat"`)."""
    return [[template.format(name) for template in templates] for name in class_names]


def zero_shot_prototypes(
    model: torch.nn.Module,
    tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str] = SINGLE_TEMPLATE,
    batch_size: int = 256,
) -> torch.Tensor:
    """Zero-shot CLIP classifier: prototypes from `templates` filled with each class name.

    Use `SINGLE_TEMPLATE` (`"a photo of a {}"`) or `OPENAI_IMAGENET_TEMPLATES` (the 80-template ensemble), both in
    `TEMPLATE_PRESETS`.
    """
    return build_class_prototypes(model, tokenizer, template_texts(class_names, templates), batch_size)


def save_class_prototypes(
    prototypes: torch.Tensor, labels: Sequence[str], save_directory: str, metadata: dict | None = None
) -> str:
    """Checks and writes `prototypes` and their `labels` to `save_directory/class_prototypes.safetensors`.

    The file format is `mmft_hf.classification.remote_pipeline.write_prototypes_file`'s, which the published pipeline reads.

    Args:
        prototypes (`torch.Tensor`): `[num_classes, dim]` class embeddings.
        labels (`Sequence[str]`): the class names, in row order.
        save_directory (`str`): the checkpoint directory (created if missing).
        metadata (`dict`, *optional*): JSON-serialisable facts about how the prototypes were built.

    Returns:
        `str`: the path of the written file.
    """
    if prototypes.ndim != 2 or prototypes.shape[0] != len(labels):
        raise ValueError(
            f"Prototypes of shape {tuple(prototypes.shape)} do not match {len(labels)} labels; "
            "expected [num_labels, dim]."
        )
    return write_prototypes_file(prototypes, labels, save_directory, metadata)


def load_class_prototypes(directory: str) -> tuple[torch.Tensor, list[str], dict]:
    """Reads what `save_class_prototypes` wrote: `(prototypes, labels, metadata)`.

    Raises:
        `FileNotFoundError`: the directory has no prototypes file, with how to build one.
        `ValueError`: the stored labels do not match the number of prototype rows.
    """
    path = os.path.join(directory, PROTOTYPES_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No {PROTOTYPES_FILENAME} in {directory!r}. Train with MMFTTrainer (it saves prototypes with every "
            "checkpoint), or build them with `build_class_prototypes`/`zero_shot_prototypes` and save them with "
            "`save_class_prototypes(prototypes, labels, directory)`."
        )
    prototypes, labels, metadata = read_prototypes_file(path)
    if prototypes.ndim != 2 or prototypes.shape[0] != len(labels):
        raise ValueError(
            f"{path} holds {prototypes.shape[0]} prototypes but {len(labels)} labels; rebuild the prototypes."
        )
    return prototypes, labels, metadata
