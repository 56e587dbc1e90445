"""The MMFT training loss: a CLIP (InfoNCE) term plus a supervised-contrastive term over same-class pairs.

Pure functions of logits and labels (see `method.md` §5). They know nothing of models or datasets; the caller
builds the logits, usually over the global batch with `mmft_hf.training.distributed.gather_batch` and `global_logits`.

Notation: B pairs (image i, caption i, label y_i); `logits_per_image[i, j] = s * <u_i, v_j>` and
`logits_per_text[j, i]` the text-to-image logits (its transpose for CLIP; the functions never assume it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["clip_loss", "supcon_loss", "mmft_loss"]


def _as_float(tensor: torch.Tensor) -> torch.Tensor:
    # fp16/bf16 logits of magnitude ~100 lose the small differences the softmax depends on, and a logsumexp in
    # half precision rounds again; compute the loss in fp32 (keeping fp64 so gradient checks stay exact).
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def _check_square(logits: torch.Tensor, name: str) -> int:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}.")
    if logits.dim() != 2 or logits.shape[0] != logits.shape[1] or logits.shape[0] == 0:
        raise ValueError(
            f"{name} must be a non-empty square (B, B) matrix whose rows and columns index the same B "
            f"(image, caption) pairs, got shape {tuple(logits.shape)}. Compute logits over the full batch "
            "(after `gather_batch` when training on several processes), not a local slice against global columns."
        )
    return logits.shape[0]


def _check_labels(labels: torch.Tensor, batch_size: int) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of class ids, got {type(labels).__name__}.")
    if labels.dim() != 1 or labels.shape[0] != batch_size:
        raise ValueError(
            f"labels must be a 1-D tensor with one class id per pair ({batch_size} for these logits), got shape "
            f"{tuple(labels.shape)}. Gather labels together with the embeddings so both cover the same batch."
        )


def _diagonal_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    targets = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, targets)


def clip_loss(logits_per_image: torch.Tensor, logits_per_text: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with diagonal targets (CLIP/FLYP): `(CE(A, i) + CE(A_t, i)) / 2`, each a batch mean.

    Equals transformers' built-in `CLIPModel` loss (`return_loss=True`) on the same logits.

    Args:
        logits_per_image (`torch.Tensor` of shape `(B, B)`):
            Image-to-text logits; row i scores image i against every caption.
        logits_per_text (`torch.Tensor` of shape `(B, B)`):
            Text-to-image logits; row j scores caption j against every image.

    Returns:
        `torch.Tensor`: a scalar, in fp32 for fp16/bf16/fp32 inputs (fp64 for fp64 inputs).
    """
    batch_size = _check_square(logits_per_image, "logits_per_image")
    _check_square(logits_per_text, "logits_per_text")
    if logits_per_text.shape[0] != batch_size:
        raise ValueError(
            f"logits_per_image is {batch_size}x{batch_size} but logits_per_text is "
            f"{logits_per_text.shape[0]}x{logits_per_text.shape[1]}; both must cover the same B pairs."
        )
    image_loss = _diagonal_cross_entropy(_as_float(logits_per_image))
    text_loss = _diagonal_cross_entropy(_as_float(logits_per_text))
    return (image_loss + text_loss) / 2


def supcon_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Supervised-contrastive term for one direction (image->text or text->image), `method.md` §5.

    Positives of anchor i are the same-label, off-diagonal columns j (`y_i == y_j`, `i != j`): the anchor's own
    paired element is not a positive. With `log p_ij = Z_ij - logsumexp_k Z_ik` over **all** B columns, anchor i
    contributes `-(1 / n_i) * sum_j P_ij log p_ij`; the loss is the mean over the anchors that have at least one
    positive. When no anchor has a positive (all labels distinct), it falls back to cross-entropy with diagonal
    targets. Computed in fp32 with `logsumexp`, without host synchronisation (no data-dependent Python branch).

    Args:
        logits (`torch.Tensor` of shape `(B, B)`):
            Logits of one direction (`logits_per_image` or `logits_per_text`), any floating dtype.
        labels (`torch.Tensor` of shape `(B,)`):
            Class id of each pair; only equality between ids matters.

    Returns:
        `torch.Tensor`: a scalar, in fp32 for fp16/bf16/fp32 inputs (fp64 for fp64 inputs).
    """
    batch_size = _check_square(logits, "logits")
    _check_labels(labels, batch_size)
    logits = _as_float(logits)
    labels = labels.to(logits.device)

    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    off_diagonal = ~torch.eye(batch_size, dtype=torch.bool, device=logits.device)
    positives = (labels[:, None] == labels[None, :]) & off_diagonal
    num_positives = positives.sum(dim=1)
    # `where`, not a product: a -inf logit (masked column) times a 0 mask would give NaN.
    positive_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    per_anchor = -positive_log_prob / num_positives.clamp(min=1)
    has_positive = num_positives > 0
    num_anchors = has_positive.sum()
    # Clamped denominators keep both branches finite, so `where` passes no NaN gradient from the unused one.
    supervised = torch.where(has_positive, per_anchor, torch.zeros_like(per_anchor)).sum() / num_anchors.clamp(min=1)
    fallback = _diagonal_cross_entropy(logits)
    return torch.where(num_anchors > 0, supervised, fallback)


def mmft_loss(
    logits_per_image: torch.Tensor,
    logits_per_text: torch.Tensor,
    labels: torch.Tensor,
    supcon_weight: float = 0.1,
) -> torch.Tensor:
    """The MMFT loss `w * (supcon(A) + supcon(A_t)) / 2 + (1 - w) * clip_loss(A, A_t)` (`method.md` §5).

    `supcon_weight=0` is plain FLYP/CLIP fine-tuning; a term whose weight is exactly 0 is not computed.

    Args:
        logits_per_image (`torch.Tensor` of shape `(B, B)`):
            Image-to-text logits `s * u_i . v_j` over the (global) batch.
        logits_per_text (`torch.Tensor` of shape `(B, B)`):
            Text-to-image logits (the transpose of `logits_per_image` for CLIP; passed separately so models with
            asymmetric logits work).
        labels (`torch.Tensor` of shape `(B,)`):
            Class id of each (image, caption) pair.
        supcon_weight (`float`, *optional*, defaults to 0.1):
            `w`, the weight of the supervised-contrastive term, in [0, 1].

    Returns:
        `torch.Tensor`: a scalar, in fp32 for fp16/bf16/fp32 inputs (fp64 for fp64 inputs).

    Example:

    ```python
    >>> import torch
    >>> from mmft_hf.training.losses import mmft_loss
    >>> logits = 100 * torch.eye(4)
    >>> mmft_loss(logits, logits.T, torch.tensor([0, 0, 1, 1])).item() > 0
    True
    ```
    """
    batch_size = _check_square(logits_per_image, "logits_per_image")
    _check_square(logits_per_text, "logits_per_text")
    if logits_per_text.shape != logits_per_image.shape:
        raise ValueError(
            f"logits_per_image has shape {tuple(logits_per_image.shape)} but logits_per_text has shape "
            f"{tuple(logits_per_text.shape)}; both must cover the same B pairs."
        )
    _check_labels(labels, batch_size)
    if isinstance(supcon_weight, bool) or not isinstance(supcon_weight, (int, float)):
        raise TypeError(f"supcon_weight must be a number in [0, 1], got {type(supcon_weight).__name__}.")
    if not 0.0 <= supcon_weight <= 1.0:  # also rejects NaN
        raise ValueError(
            f"supcon_weight must be in [0, 1] (0 = CLIP/FLYP loss only, 1 = supervised-contrastive only), "
            f"got {supcon_weight}."
        )

    if supcon_weight == 0:
        return clip_loss(logits_per_image, logits_per_text)
    supervised = (supcon_loss(logits_per_image, labels) + supcon_loss(logits_per_text, labels)) / 2
    if supcon_weight == 1:
        return supervised
    return supcon_weight * supervised + (1 - supcon_weight) * clip_loss(logits_per_image, logits_per_text)
