"""WiSE-FT after training: put interpolated weights into a trained `MMFTTrainer`, evaluate a curve of alphas, pick
the best on validation, and plot accuracy (and zero-shot retention) against alpha.

```python
sweep = WiseFTSweep(trainer, start_model)                       # after trainer.train()
curve = sweep.curve([0, 0.25, 0.5, 0.75, 1], {"validation": val, "test": test}, retention=retention_set)
sweep.apply(best_alpha(curve))                                  # then trainer.save_model() saves that model
```
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence

import datasets
import torch

from ..training.trainer import MMFTTrainer
from ..training.wise_ft import wise_ft
from .retention import RetentionSet

logger = logging.getLogger(__name__)

WISE_FT_PLOT_FILENAME = "wise_ft_curve.png"
# the benchmark's `wiseft` method: alpha chosen on validation from this grid
DEFAULT_WISE_FT_ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class WiseFTSweep:
    """Loads WiSE-FT interpolations of a trained model into its trainer, one alpha at a time.

    The fine-tuned weights are copied when the sweep is made (call it after `trainer.train()`, with the best
    checkpoint loaded); `apply(alpha)` puts `wise_ft(start_model, finetuned, alpha)` into `trainer.model` and
    re-encodes the class prototypes with the interpolated text tower from the same prototype texts (captions or
    templates), so a following `trainer.save_model()` saves that model and its prototypes.

    Args:
        trainer (`MMFTTrainer`): the trained trainer (full fine-tuning or LoRA).
        start_model (`torch.nn.Module`): the model training started from (same architecture, no adapters).
    """

    def __init__(self, trainer: MMFTTrainer, start_model: torch.nn.Module):
        self.trainer = trainer
        self.start_model = start_model
        self.finetuned = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model))
        wise_ft(start_model, self.finetuned, 1.0)  # fails now, not after evaluations, on mismatched models
        self.alpha: float = 1.0

    def apply(self, alpha: float) -> None:
        """Loads the weights of `wise_ft(start_model, finetuned, alpha)` into `trainer.model`."""
        interpolated = wise_ft(self.start_model, self.finetuned, alpha)
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        model.load_state_dict(interpolated.state_dict())
        self.trainer.compute_class_prototypes()  # cached for save_model: these weights' prototypes
        self.alpha = float(alpha)

    def curve(
        self,
        alphas: Sequence[float],
        splits: Mapping[str, datasets.Dataset],
        retention: RetentionSet | None = None,
    ) -> list[dict]:
        """Evaluates every alpha on `splits` (and the zero-shot `retention` set).

        Returns:
            `list[dict]`, one per alpha in the given order: `{"alpha", "<split>_accuracy" for each split,
            "retention_accuracy" (with a retention set)}`. The trainer is left at the last alpha.
        """
        points = []
        for alpha in alphas:
            self.apply(alpha)
            point = {"alpha": float(alpha)}
            for name, split in splits.items():
                metrics = self.trainer.evaluate(split, metric_key_prefix=f"wise_ft_{name}")
                point[f"{name}_accuracy"] = metrics[f"wise_ft_{name}_accuracy"]
            if retention is not None:
                point["retention_accuracy"] = retention.accuracy(
                    self.trainer.model, self.trainer.processing_class, self.trainer.args.per_device_eval_batch_size
                )
            logger.info("WiSE-FT alpha %s: %s", alpha, {k: round(v, 4) for k, v in point.items() if k != "alpha"})
            points.append(point)
        return points


def best_alpha(curve: Sequence[dict], key: str = "validation_accuracy") -> float:
    """The alpha with the highest `key` (validation accuracy); among equals the first in the curve's order."""
    if not curve:
        raise ValueError("The WiSE-FT curve is empty: give at least one alpha.")
    best = curve[0]
    for point in curve[1:]:
        if point[key] > best[key]:
            best = point
    return best["alpha"]


def plot_wise_ft_curve(
    curve: Sequence[dict], path: str | os.PathLike, retention_name: str | None = None
) -> str | None:
    """Draws accuracy (%) against alpha, one line per measured split and zero-shot retention; returns the path, or
    `None` without matplotlib (extra `plot`)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed (extra `plot`): no WiSE-FT curve plot.")
        return None
    alphas = [point["alpha"] for point in curve]
    keys = [key for key in curve[0] if key.endswith("_accuracy")]
    figure, axis = plt.subplots(figsize=(5, 4))
    try:
        for key in keys:
            label = key.removesuffix("_accuracy")
            if key == "retention_accuracy":
                label = f"zero-shot retention ({retention_name})" if retention_name else "zero-shot retention"
            axis.plot(alphas, [100 * point[key] for point in curve], marker="o", label=label,
                      linestyle="--" if key == "retention_accuracy" else "-")  # fmt: skip
        axis.set_xlabel("alpha (0: start model, 1: fine-tuned)")
        axis.set_ylabel("accuracy (%)")
        axis.set_title("WiSE-FT")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
        figure.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        figure.savefig(path, dpi=120)
    finally:
        plt.close(figure)
    return os.fspath(path)
