"""Gradient caching for contrastive batches larger than memory allows (GradCache, Gao et al. 2021).

A contrastive loss couples every pair of the batch, so the batch cannot be split into independent micro-batches the
way gradient accumulation splits a sum of per-sample losses. GradCache splits the *computation* instead:

1. embed the batch chunk by chunk without the autograd graph (memory of one chunk);
2. compute the loss over all embeddings (gathered over processes) and its gradient `g = dL/d(embeddings)`, which
   costs only the `(B, D)` embeddings;
3. embed each chunk again with the graph and back-propagate `sum(embeddings * g)`, whose parameter gradient is the
   chunk's share of `dL/dtheta` (chain rule); the chunks' shares add up in `.grad`.

The gradient is therefore exactly that of the loss of step 2, provided step 3 sees exactly the inputs of step 1: the
collator draws crops before the step, and `RandomState` replays each chunk's dropout masks. Without dropout the
weights follow the unchunked run within float rounding; with dropout the masks are drawn per chunk instead of per
batch, so the two runs differ as two dropout draws do.
`MMFTTrainer.training_step` drives the three steps; this module holds the pieces that do not need the trainer.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import torch

__all__ = ["RandomState", "cached_gradient_objective", "split_rows"]


def split_rows(inputs: Mapping[str, object], chunk_size: int) -> list[dict]:
    """Splits a model-input batch into consecutive chunks of at most `chunk_size` rows.

    Every tensor whose first dimension is the batch size is sliced (`input_ids`, `pixel_values`, SigLIP 2's
    `pixel_attention_mask` and `spatial_shapes`, ...); anything else is passed to every chunk unchanged.

    Args:
        inputs (`Mapping[str, object]`): the model's keyword arguments for one batch (without `labels`).
        chunk_size (`int`): rows per chunk; the last chunk holds the remainder.

    Returns:
        `list[dict]`: the chunks in row order; concatenating their rows gives back `inputs`.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}.")
    sizes = {value.shape[0] for value in inputs.values() if isinstance(value, torch.Tensor) and value.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"Cannot split a batch whose tensors disagree on the number of rows: {sorted(sizes)}.")
    (rows,) = sizes
    return [
        {
            key: value[start : start + chunk_size] if isinstance(value, torch.Tensor) and value.dim() > 0 else value
            for key, value in inputs.items()
        }
        for start in range(0, rows, chunk_size)
    ]


@dataclasses.dataclass(frozen=True)
class RandomState:
    """The random-number state a forward pass starts from (CPU, and the CUDA device it runs on), to replay it.

    Dropout draws its masks from these generators: capturing the state before a chunk's pass without gradients and
    replaying it before the pass with gradients gives both passes the same masks.
    """

    cpu: torch.Tensor
    device: torch.device
    cuda: torch.Tensor | None

    @classmethod
    def capture(cls, device: torch.device | str) -> RandomState:
        """The current state of the CPU generator and, when `device` is a CUDA device, of that device's."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), device, cuda)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Runs the block from the captured state; the generators continue from where they were after it."""
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def cached_gradient_objective(tensors: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]) -> torch.Tensor:
    """`sum_i <tensors[i], gradients[i]>` in float32 or wider: back-propagating it sends `gradients[i]` into `tensors[i]`.

    Its value is meaningless; its gradient with respect to anything upstream of `tensors` is the cached loss
    gradient pushed through the graph (the chain rule), which is what step 3 of GradCache needs.

    Args:
        tensors (`Sequence[torch.Tensor]`): outputs of a forward pass with the graph (a chunk's embeddings, and the
            parameters the loss used directly, such as `logit_scale`).
        gradients (`Sequence[torch.Tensor]`): the loss gradient for each of them, same shapes, no graph.

    Returns:
        `torch.Tensor`: a scalar.
    """
    if len(tensors) != len(gradients):
        raise ValueError(f"Got {len(tensors)} tensors and {len(gradients)} gradients.")
    total = 0
    for tensor, gradient in zip(tensors, gradients, strict=True):
        dtype = torch.promote_types(tensor.dtype, torch.float32)  # float32 at least (bf16/fp16 towers), float64 kept
        total = total + (tensor.to(dtype) * gradient.detach().to(dtype)).sum()
    return total
