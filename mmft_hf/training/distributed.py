"""Global-batch contrastive loss under data parallelism: all-gather embeddings with gradient, then build logits.

Under DDP each process holds a local batch b. For the loss to equal the one-process loss on the global batch N*b
(same value, same gradients), every process gathers all embeddings and labels and computes the *same* global loss:

- `gather_batch` concatenates the N local batches in rank order. Its backward sums, over processes, the gradient
  each one computed for a given rank's rows (an all-reduce, then that rank's slice). Since all N processes
  hold the same loss L, rank r receives `N * dL/d(its embeddings)`.
- DDP then averages parameter gradients over the N processes: `(1/N) * sum_r N * dL/dtheta|_r = dL/dtheta` for
  the towers. `logit_scale` is used directly (not gathered), so each process already has the full `dL/ds`, and
  the average of N equal copies is `dL/ds`. Both match the single-process gradient of the global loss, also
  with unequal local batch sizes (checked by `tests/test_distributed.py` in a real two-process run).

Usage in a Trainer's `compute_loss` (unwrap DDP to reach `logit_scale`):

```python
img, txt, labels = gather_batch(out.image_embeds, out.text_embeds, labels)
core = self.accelerator.unwrap_model(model)
logits_per_image, logits_per_text = global_logits(img, txt, core.logit_scale.exp(), getattr(core, "logit_bias", None))
loss = mmft_loss(logits_per_image, logits_per_text, labels, supcon_weight=w)
```
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["gather_batch", "global_logits", "is_distributed"]


def is_distributed() -> bool:
    """Whether a default `torch.distributed` process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_sizes(local_size: int, device: torch.device) -> list[int]:
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([local_size], dtype=torch.long, device=device))
    return [int(size.item()) for size in sizes]


def _all_gather_rows(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All-gathers `tensor` (dim 0 may differ per rank) and concatenates the pieces in rank order; no autograd."""
    largest = max(sizes)
    tensor = tensor.contiguous()
    if tensor.shape[0] < largest:  # all_gather needs equal shapes: pad, then trim each piece
        padding = tensor.new_zeros((largest - tensor.shape[0], *tensor.shape[1:]))
        tensor = torch.cat([tensor, padding])
    pieces = [torch.empty_like(tensor) for _ in sizes]
    dist.all_gather(pieces, tensor)
    return torch.cat([piece[:size] for piece, size in zip(pieces, sizes, strict=True)])


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns this rank's rows of the gradient summed over all ranks.

    torch.distributed.nn.functional.all_gather has the same (correct) sum semantics but needs equal shapes on
    every rank; this one also handles a smaller last batch. The backward all-reduces the full (B_global, D)
    gradient, which is tiny for embeddings, and works on every backend (gloo has no reduce_scatter).
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        rank = dist.get_rank()
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
        return _all_gather_rows(tensor, sizes)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.stop], None


def gather_batch(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenates every process's embeddings (with gradient) and labels (without) in rank order.

    A no-op returning its inputs unchanged when `torch.distributed` is not initialised or has one process. All
    processes must call it the same number of times (it runs collectives, in training and evaluation alike).
    Local batch sizes may differ between processes.

    Args:
        image_embeds (`torch.Tensor` of shape `(b, D)`):
            This process's image embeddings (L2-normalised, e.g. `CLIPOutput.image_embeds`).
        text_embeds (`torch.Tensor` of shape `(b, D)`):
            This process's text embeddings, row i paired with image i.
        labels (`torch.Tensor` of shape `(b,)`):
            Class ids of the b pairs.

    Returns:
        `tuple[torch.Tensor, torch.Tensor, torch.Tensor]`: `(image_embeds, text_embeds, labels)` over the global
        batch, shapes `(B, D)`, `(B, D)` and `(B,)` with B the sum of the local sizes. Gradients flowing into the
        gathered embeddings return to the process that produced each row, summed over processes.
    """
    if image_embeds.shape[0] != text_embeds.shape[0] or labels.shape[0] != image_embeds.shape[0]:
        raise ValueError(
            f"gather_batch needs one row per pair: got {image_embeds.shape[0]} image embeddings, "
            f"{text_embeds.shape[0]} text embeddings and {labels.shape[0]} labels on this process."
        )
    if not is_distributed():
        return image_embeds, text_embeds, labels
    sizes = _gather_sizes(image_embeds.shape[0], image_embeds.device)
    all_images = _GatherWithGrad.apply(image_embeds, sizes)
    all_texts = _GatherWithGrad.apply(text_embeds, sizes)
    with torch.no_grad():  # NCCL needs the labels on the embeddings' device
        all_labels = _all_gather_rows(labels.to(image_embeds.device), sizes).to(labels.device)
    return all_images, all_texts, all_labels


def global_logits(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP-style logits `scale * img @ txt.T (+ bias)` from already L2-normalised embeddings.

    Args:
        image_embeds (`torch.Tensor` of shape `(B, D)`):
            Normalised image embeddings (e.g. from `gather_batch`).
        text_embeds (`torch.Tensor` of shape `(B, D)`):
            Normalised text embeddings.
        logit_scale (`torch.Tensor` or `float`):
            The multiplicative scale, already exponentiated (`model.logit_scale.exp()` for CLIP).
        logit_bias (`torch.Tensor` or `float`, *optional*):
            An additive bias (SigLIP's `logit_bias`); `None` for CLIP.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `(logits_per_image, logits_per_text)`, each `(B, B)`, the second the
        transpose of the first (as `CLIPModel` returns them).
    """
    if image_embeds.dim() != 2 or text_embeds.dim() != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(
            f"Expected (B, D) image and text embeddings with the same D, got {tuple(image_embeds.shape)} and "
            f"{tuple(text_embeds.shape)}."
        )
    logits_per_text = text_embeds @ image_embeds.t() * logit_scale
    if logit_bias is not None:
        logits_per_text = logits_per_text + logit_bias
    return logits_per_text.t(), logits_per_text
