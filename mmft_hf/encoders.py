"""Embedding texts with the text tower of any dual encoder (CLIP, SigLIP, VisionTextDualEncoder), in batches."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

CLIP_CONTEXT_LENGTH = 77  # tokens, counting <|startoftext|> and <|endoftext|>


def pooled_output(features) -> torch.Tensor:
    """`get_*_features` returns a tensor in transformers v4 and a `BaseModelOutputWithPooling` in v5."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) inside the block; every submodule's previous mode is restored after it."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def text_padding(model: torch.nn.Module) -> bool | str:
    """How a dual encoder's texts are padded: `"max_length"` for SigLIP and SigLIP 2, `True` (longest) otherwise.

    SigLIP's text tower pools the hidden state at the **last position** (not at an `eos` token, as CLIP does, nor
    at `[CLS]`), and it was trained on texts padded to the full context length, so its texts must be padded the
    same way wherever they are encoded (training batches and class prototypes). transformers' own
    zero-shot-image-classification pipeline makes the same choice.
    """
    return "max_length" if "siglip" in getattr(getattr(model, "config", None), "model_type", "") else True


def max_text_length(model: torch.nn.Module | PreTrainedConfig | None, tokenizer) -> int:
    """The most tokens a text may have wherever a dual encoder reads it: training batches (`MMFTDataCollator`),
    class prototypes (`encode_texts`) and caption statistics (`caption_stats`, CLIPScore).

    The smallest of the tokenizer's `model_max_length` and the text tower's `max_position_embeddings`: a SigLIP whose
    tokenizer allows 77 tokens but whose text tower has 64 positions reads 64, and a tokenizer without a limit
    (transformers reports a huge `model_max_length`, as for SigLIP 2's Gemma tokenizer) leaves the model's. Without
    a model, CLIP's context of 77 tokens bounds the tokenizer's limit.

    Args:
        model (`torch.nn.Module`, `PreTrainedConfig` or `None`): the dual encoder (or its config); `None` when only
            the tokenizer is known.
        tokenizer: the model's tokenizer.

    Returns:
        `int`: the limit, counting the start and end tokens.
    """
    limits = [getattr(tokenizer, "model_max_length", None)]
    if model is None:
        limits.append(CLIP_CONTEXT_LENGTH)
    else:
        config = getattr(model, "config", model)
        config = getattr(config, "text_config", config)
        limits.append(getattr(config, "max_position_embeddings", None))
    usable = [limit for limit in limits if isinstance(limit, int) and limit > 0]
    if not usable:
        raise ValueError(
            f"Cannot tell how many tokens a text may have: the tokenizer's model_max_length is {limits[0]!r} and the "
            "model's text config has no max_position_embeddings. Set tokenizer.model_max_length."
        )
    return min(usable)


@torch.no_grad()
def encode_texts(model: torch.nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Encodes `texts` with the text tower of `model` in batches and L2-normalises each embedding.

    The model runs in eval mode (no dropout, so the result is deterministic) and is given back in the mode it was
    in.

    Args:
        model (`torch.nn.Module`): a dual encoder with `get_text_features` (e.g. `CLIPModel`).
        tokenizer: the model's tokenizer; texts are truncated to the model's context length, keeping the EOS,
            and padded as `text_padding(model)` says (to the context length for SigLIP).
        texts (`Sequence[str]`): the texts.
        batch_size (`int`, defaults to 256): texts encoded per forward pass (bounds memory).

    Returns:
        `torch.Tensor` of shape `[len(texts), dim]`, float32, on the model's device.
    """
    device, max_length, padding = model_device(model), max_text_length(model, tokenizer), text_padding(model)
    chunks = []
    with eval_mode(model):
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(
                list(texts[start : start + batch_size]),
                padding=padding,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            embeddings = pooled_output(model.get_text_features(**tokens)).float()
            chunks.append(torch.nn.functional.normalize(embeddings, dim=-1))
    return torch.cat(chunks) if chunks else torch.empty(0, 0, device=device)
