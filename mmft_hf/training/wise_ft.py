"""WiSE-FT (Wortsman et al., 2022): interpolate the weights of a fine-tuned model with those of the model it started
from, `(1 - alpha) * start + alpha * finetuned`, to keep much of the starting model's zero-shot accuracy.

```python
from mmft_hf import wise_ft
model = wise_ft(pretrained_clip, finetuned_clip, alpha=0.5)   # a CLIPModel, both towers and logit_scale mixed
```
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

import torch

# A LoRA layer's state-dict entries under peft: the wrapped weight and the adapter's two factors.
_BASE_LAYER = ".base_layer."
# (`lora_A.<adapter>.weight` for linear layers; `lora_embedding_A.<adapter>`, a bare parameter, for embeddings)
_LORA_B = re.compile(r"\.lora_(?:B|embedding_B)\.[^.]+(?:\.|$)")
_LORA_A = re.compile(r"\.lora_(?:A|embedding_A)\.[^.]+(?:\.|$)")


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def _mix(start: torch.Tensor, finetuned: torch.Tensor, alpha: float) -> torch.Tensor:
    """`(1 - alpha) * start + alpha * finetuned` in at least float32, in `finetuned`'s dtype and device."""
    compute = torch.promote_types(finetuned.dtype, torch.float32)
    start = start.to(device=finetuned.device, dtype=compute)
    return ((1 - alpha) * start + alpha * finetuned.to(compute)).to(finetuned.dtype)


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(
            f"WiSE-FT alpha must be in [0, 1] (0: the starting model, 1: the fine-tuned one), got {alpha}."
        )
    return alpha


def _describe_mismatch(start: dict, finetuned: dict, start_name: str, finetuned_name: str) -> str | None:
    only_start = sorted(set(start) - set(finetuned))
    only_finetuned = sorted(set(finetuned) - set(start))
    shapes = [
        f"{key}: {tuple(start[key].shape)} vs {tuple(finetuned[key].shape)}"
        for key in sorted(set(start) & set(finetuned))
        if start[key].shape != finetuned[key].shape
    ]
    problems = []
    for label, items in ((f"only in {start_name}", only_start), (f"only in {finetuned_name}", only_finetuned),
                         ("shapes differ", shapes)):  # fmt: skip
        if items:
            problems.append(f"{label} ({len(items)}): {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}")
    return "; ".join(problems) or None


def wise_ft(start_model: torch.nn.Module, finetuned_model: torch.nn.Module, alpha: float) -> torch.nn.Module:
    """WiSE-FT weight-space ensemble: a new model whose every floating-point weight is
    `(1 - alpha) * start + alpha * finetuned`.

    Both towers, their projections, `logit_scale` and `logit_bias` are interpolated; integer buffers (e.g.
    `position_ids`) are copied from `finetuned_model`. Neither input is modified. The result is computed in float32
    (or wider) and stored in `finetuned_model`'s dtypes, on its devices; `alpha=0` and `alpha=1` give the two models'
    weights exactly.

    For a LoRA run (`finetuned_model` a peft `PeftModel`, e.g. `MMFTTrainer(...).model` with `use_lora=True`),
    `alpha` scales the adapter's update: the adapters' `B` factors are multiplied by `alpha` and the weights outside
    the adapters (`logit_scale`, any wrapped weight that differs from `start_model`) are interpolated. Merged, this
    equals interpolating the merged weights, since the merged update `B A * scaling` is linear in `B`. The result is
    a `PeftModel` again; `merge_and_unload()` gives the plain model.

    Args:
        start_model (`torch.nn.Module`): the model fine-tuning started from (e.g. the pre-trained `CLIPModel`).
        finetuned_model (`torch.nn.Module`): the fine-tuned model: the same class and architecture, or a peft
            `PeftModel` wrapping one.
        alpha (`float`): the weight of the fine-tuned model, in [0, 1].

    Returns:
        `torch.nn.Module`: a new model of `finetuned_model`'s class (a deep copy holding the interpolated weights).

    Raises:
        `ValueError`: for `alpha` outside [0, 1], a peft `start_model`, models of different classes or architectures
            (naming the parameters only one has and those whose shapes differ), or a DoRA adapter (whose update is
            not linear in its factors).
    """
    alpha = _check_alpha(alpha)
    if _is_peft(start_model):
        raise ValueError("start_model is a peft model: pass the model fine-tuning started from, without adapters.")
    peft = _is_peft(finetuned_model)
    base = finetuned_model.get_base_model() if peft else finetuned_model
    if type(base) is not type(start_model):
        raise ValueError(
            f"WiSE-FT interpolates two models of one architecture; got {type(start_model).__name__} (start) and "
            f"{type(base).__name__} (fine-tuned)."
        )
    if peft and any(getattr(config, "use_dora", False) for config in finetuned_model.peft_config.values()):
        raise ValueError(
            "WiSE-FT of a DoRA adapter is not supported: its update is not linear in the adapter weights."
        )
    start_state = start_model.state_dict()
    result = copy.deepcopy(finetuned_model)
    finetuned_state = result.state_dict()
    # the starting model's name of every non-adapter entry of the fine-tuned state dict
    names = {}
    for key in finetuned_state:
        if _LORA_A.search(key) or _LORA_B.search(key):
            continue
        name = key
        if peft:
            prefix = "base_model.model."
            name = name[len(prefix) :] if name.startswith(prefix) else name
            name = name.replace(_BASE_LAYER, ".")
        names[key] = name
    mapped = {name: finetuned_state[key] for key, name in names.items()}
    mismatch = _describe_mismatch(start_state, mapped, "the start model", "the fine-tuned model")
    if mismatch:
        raise ValueError(f"The two models' architectures differ, so their weights cannot be interpolated: {mismatch}.")
    interpolated = {}
    for key, value in finetuned_state.items():
        if _LORA_B.search(key):
            interpolated[key] = value * alpha if value.is_floating_point() else value
        elif key in names and value.is_floating_point():
            interpolated[key] = _mix(start_state[names[key]], value, alpha)
    with torch.no_grad():
        for key, value in interpolated.items():
            finetuned_state[key].copy_(value)
    return result


def parse_alphas(text: str | float | Sequence[float]) -> list[float]:
    """`"0,0.25,0.5"` -> `[0.0, 0.25, 0.5]`: the WiSE-FT mixing weights of `--wise_ft_alpha`.

    Raises:
        `ValueError`: for an empty list, a value that is not a number in [0, 1], or a repeated value.
    """
    items = [text] if isinstance(text, (int, float)) else text.split(",") if isinstance(text, str) else list(text)
    alphas = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"--wise_ft_alpha {text!r}: {item!r} is not a number; give values in [0, 1], e.g. "
                             "'0.5' or '0,0.25,0.5,0.75,1'.") from None  # fmt: skip
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"--wise_ft_alpha {text!r}: {value} is outside [0, 1] (0: the starting model, 1: the "
                             "fine-tuned one).")  # fmt: skip
        if value in alphas:
            raise ValueError(f"--wise_ft_alpha {text!r}: {value} is given twice.")
        alphas.append(value)
    if not alphas:
        raise ValueError(f"--wise_ft_alpha {text!r} names no value; e.g. '0.5' or '0,0.25,0.5,0.75,1'.")
    return alphas
