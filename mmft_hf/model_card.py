"""Model cards for MMFT classifiers: metadata (model-index accuracy, base model, dataset, tags) plus prose.

The trainer fills an `MMFTModelCardData` at the end of a run and calls `create_model_card(card_data, output_dir)`,
which renders `templates/model_card.md` (linked from the repository's `model_cards/`) with
`huggingface_hub.ModelCard.from_template` and writes `output_dir/README.md`, offline. With matplotlib installed
(extra `plot`) it also draws `per_class_accuracy.png` and shows it in the card.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"
PLOT_FILENAME = "per_class_accuracy.png"
PIPELINE_TAG = "zero-shot-image-classification"  # a CLIPModel; the Hub widget for CLIP checkpoints works with it
DEFAULT_MODEL_ID = "path/to/this/model"
# How the class prototypes were built (`MMFTTrainingArguments.prototype_source`), as the card describes them.
PROTOTYPE_DESCRIPTIONS = {
    "captions": "the normalised mean of the class's training-caption embeddings",
    "single_template": 'the embedding of the prompt "a photo of a {class name}"',
    "ensemble": "the normalised mean of the embeddings of OpenAI's 80 ImageNet prompts filled with the class name",
    None: "a normalised text embedding of the class",
}


@dataclass
class MMFTModelCardData:
    """What a training run knows about the model it produced. Every field is optional.

    Args:
        model_id (`str`, *optional*): the Hub repository id (used in usage snippets).
        model_name (`str`, *optional*): display name and `model-index` name; defaults to `model_id`.
        base_model (`str`, *optional*): the checkpoint fine-tuned (e.g. `"openai/clip-vit-base-patch32"`); a local
            path is written as `portable_reference` names it.
        model_class (`str`, defaults to `"CLIPModel"`): the transformers class the checkpoint loads with.
        dataset_id (`str`, *optional*): the captioned dataset (Hub id or path, written as `portable_reference`
            names it).
        dataset_name (`str`, *optional*): its display name; defaults to `dataset_id`.
        domain (`str`, *optional*): the caption prompt's domain word (e.g. `"textures"`).
        captioner (`str`, *optional*): the MLLM that wrote the captions.
        caption_prompt (`str`, *optional*): the caption prompt template.
        caption_types (`list[str]`): e.g. `["visual", "shape", "texture"]`.
        supcon_weight (`float`, *optional*): `w` in `w·L_sup + (1−w)·L_clip`.
        num_shots (`int`, *optional*): images per class (`None`: full data).
        seed (`int`, *optional*): the run seed.
        hyperparameters (`dict`): name -> value, shown as a table.
        eval_accuracy (`float`, *optional*): top-1 accuracy as a fraction in [0, 1].
        eval_split (`str`, defaults to `"test"`): the split `eval_accuracy` was measured on.
        per_class_accuracy (`dict[str, float]`): class name -> accuracy fraction.
        labels (`list[str]`): class names, in prototype order (orders the per-class table).
        lora (`dict`, *optional*): LoRA facts, e.g. `{"r": 4, "lora_alpha": 8, "target_modules": [...],
            "merged": True}`; `None` for full fine-tuning. `"merged": False` means the repository holds the adapter
            only, and the card shows how to load it with peft.
        remote_code (`bool`, defaults to `True`): whether the repository carries `remote_pipeline.py`.
        prototype_source (`str`, *optional*): how the stored class prototypes were built: `"captions"` (the
            training captions, MMFT), `"single_template"` (`"a photo of a {}"`) or `"ensemble"` (OpenAI's 80
            templates); `None` when unknown (the card then describes them generically).
        wise_ft_alpha (`float`, *optional*): the saved weights are the WiSE-FT interpolation
            `(1 - alpha) * start + alpha * fine-tuned`; `None` when they are the fine-tuned weights.
        wise_ft_curve (`list[dict]`): the alphas evaluated, each `{"alpha", "validation_accuracy", "test_accuracy",
            "retention_accuracy"}` (the accuracies measured), shown as a table when there are several.
        wise_ft_plot (`str`, *optional*): the curve's plot, a file name in the model directory.
        retention_dataset (`str`, *optional*): the dataset whose zero-shot accuracy was tracked.
        retention_accuracy_before (`float`, *optional*) / retention_accuracy_after (`float`, *optional*): its
            zero-shot accuracy (fraction) before fine-tuning and of the saved model.
        license (`str`, *optional*): the licence id (follow the base model's).
        tags (`list[str]`): extra tags.
    """

    model_id: str | None = None
    model_name: str | None = None
    base_model: str | None = None
    model_class: str = "CLIPModel"
    dataset_id: str | None = None
    dataset_name: str | None = None
    domain: str | None = None
    captioner: str | None = None
    caption_prompt: str | None = None
    caption_types: list[str] = field(default_factory=list)
    supcon_weight: float | None = None
    num_shots: int | None = None
    seed: int | None = None
    hyperparameters: dict = field(default_factory=dict)
    eval_accuracy: float | None = None
    eval_split: str = "test"
    per_class_accuracy: dict[str, float] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    lora: dict | None = None
    remote_code: bool = True
    prototype_source: str | None = None
    wise_ft_alpha: float | None = None
    wise_ft_curve: list[dict] = field(default_factory=list)
    wise_ft_plot: str | None = None
    retention_dataset: str | None = None
    retention_accuracy_before: float | None = None
    retention_accuracy_after: float | None = None
    license: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.prototype_source not in PROTOTYPE_DESCRIPTIONS:
            sources = [source for source in PROTOTYPE_DESCRIPTIONS if source is not None]
            raise ValueError(f"prototype_source must be one of {sources} or None, got {self.prototype_source!r}.")
        values = {
            "eval_accuracy": self.eval_accuracy,
            "retention_accuracy_before": self.retention_accuracy_before,
            "retention_accuracy_after": self.retention_accuracy_after,
            **{f"per_class_accuracy[{k!r}]": v for k, v in self.per_class_accuracy.items()},
            **{
                f"wise_ft_curve[{i}][{k!r}]": v
                for i, point in enumerate(self.wise_ft_curve)
                for k, v in point.items()
                if k.endswith("_accuracy")
            },
        }
        if self.wise_ft_alpha is not None and not 0.0 <= float(self.wise_ft_alpha) <= 1.0:
            raise ValueError(f"wise_ft_alpha = {self.wise_ft_alpha} is not in [0, 1].")
        for name, value in values.items():
            if value is not None and not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} = {value} is not a fraction in [0, 1] (pass 0.8765, not 87.65).")

    @property
    def adapter_only(self) -> bool:
        """Whether the repository holds a LoRA adapter rather than a full checkpoint (`lora["merged"]` is False)."""
        return self.lora is not None and self.lora.get("merged") is False

    @property
    def resolved_model_name(self) -> str:
        return self.model_name or self.model_id or "mmft-clip-classifier"

    def per_class_rows(self) -> list[tuple[str, float]]:
        """(class, accuracy) in label order, then any classes not in `labels`."""
        ordered = [label for label in self.labels if label in self.per_class_accuracy]
        ordered += [label for label in self.per_class_accuracy if label not in set(ordered)]
        return [(label, float(self.per_class_accuracy[label])) for label in ordered]

    def to_hub_card_data(self) -> ModelCardData:
        """The YAML metadata: `model-index` accuracy, base model, dataset, tags, licence and pipeline tag."""
        tags = ["mmft", "clip", "image-classification", "synthetic-captions"]
        if self.num_shots is not None:
            tags.append("few-shot")
        if self.lora is not None:
            tags.append("lora")
        tags += [tag for tag in self.tags if tag not in tags]
        eval_results = None
        dataset_id = portable_reference(self.dataset_id)[0]
        if self.eval_accuracy is not None:
            dataset = dataset_id or "custom"
            eval_results = [
                EvalResult(
                    task_type="image-classification",
                    task_name="Image Classification",
                    dataset_type=dataset,
                    dataset_name=self.dataset_name or dataset,
                    dataset_split=self.eval_split,
                    metric_type="accuracy",
                    metric_name="Top-1 accuracy",
                    metric_value=float(self.eval_accuracy),
                )
            ]
        return ModelCardData(
            model_name=self.resolved_model_name,
            base_model=portable_reference(self.base_model)[0],
            datasets=[dataset_id] if dataset_id else None,
            eval_results=eval_results,
            license=self.license,
            library_name="transformers",
            pipeline_tag=PIPELINE_TAG,
            tags=tags,
        )


# a folder of the Hub cache: <cache>/models--org--name/snapshots/<revision> ("--" never occurs in a repo id)
_HUB_CACHE_FOLDER = re.compile(r"(?:models|datasets)--(?P<repo>.+)")


def portable_reference(name_or_path: str | os.PathLike | None) -> tuple[str | None, bool]:
    """How a card names a model or dataset, without the local paths of the machine that made it.

    A Hub id is kept. A local path (absolute, starting with `.`/`~`, or an existing file or folder) becomes the Hub
    id it is a snapshot of when it lies in the Hub cache (`.../models--org--name/snapshots/<revision>`), else the
    folder's own name.

    Args:
        name_or_path (`str` or `os.PathLike`, *optional*): a Hub id or a local path.

    Returns:
        `(reference, is_hub_id)`: `(None, False)` for `None` or `""`.
    """
    if not name_or_path:
        return None, False
    text = os.fspath(name_or_path)
    if not (os.path.isabs(text) or text.startswith((".", "~")) or os.path.exists(text)):
        return text, True
    parts = Path(os.path.abspath(os.path.expanduser(text))).parts
    for folder, below in zip(parts, parts[1:]):
        match = _HUB_CACHE_FOLDER.fullmatch(folder)
        if match and below == "snapshots":
            return match["repo"].replace("--", "/"), True
    return Path(os.path.normpath(os.path.abspath(os.path.expanduser(text)))).name, False


def _hub_url(identifier: str | None, datasets: bool = False) -> str | None:
    """The Hub page of a Hub id; `None` for a local model or dataset (named by its folder, it has no page)."""
    reference, on_hub = portable_reference(identifier)
    if not on_hub:
        return None
    return f"https://huggingface.co/{'datasets/' if datasets else ''}{reference}"


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("mmft-hf", "transformers", "torch", "peft", "huggingface_hub"):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


def _lora_summary(lora: dict | None) -> str:
    if lora is None:
        return "no (full fine-tuning)"
    facts = ", ".join(f"{key}={value}" for key, value in lora.items())
    return f"yes ({facts})" if facts else "yes"


def _wise_ft_table(curve: list[dict], retention_dataset: str | None) -> tuple[list[str], list[list[str]]]:
    """The WiSE-FT curve as table columns and rows (accuracies in %); empty for fewer than two alphas."""
    if len(curve) < 2:
        return [], []
    keys = [key for key in curve[0] if key.endswith("_accuracy")]
    names = {"retention_accuracy": f"zero-shot on {retention_dataset or 'the retention set'} (%)"}
    columns = ["alpha", *(names.get(key, key.removesuffix("_accuracy") + " (%)") for key in keys)]
    rows = [[f"{point['alpha']:g}", *(f"{100 * point[key]:.2f}" for key in keys)] for point in curve]
    return columns, rows


def plot_per_class_accuracy(per_class: list[tuple[str, float]], path: str | os.PathLike) -> str | None:
    """Draws a horizontal bar chart of per-class accuracy to `path`; returns `None` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed (extra `plot`): the model card has no per-class accuracy chart.")
        return None
    names = [name for name, _ in per_class]
    values = [100 * value for _, value in per_class]
    height = min(2 + 0.25 * len(names), 60)  # readable bars, bounded for 1,000 classes
    figure, axis = plt.subplots(figsize=(7, height))
    try:
        positions = list(range(len(names)))
        axis.barh(positions, values, color="#4C72B0")
        axis.set_yticks(positions, labels=names, fontsize=8 if len(names) <= 60 else 4)
        axis.invert_yaxis()  # first class on top, as in the table
        axis.set_xlim(0, 100)
        axis.set_xlabel("Top-1 accuracy (%)")
        axis.set_title("Per-class accuracy")
        figure.tight_layout()
        figure.savefig(path, dpi=100)
    finally:
        plt.close(figure)
    return os.fspath(path)


def create_model_card(
    card_data: MMFTModelCardData, output_dir: str | os.PathLike, template_path: str | os.PathLike | None = None
) -> ModelCard:
    """Renders the MMFT model card and saves it as `output_dir/README.md` (no Hub access).

    Args:
        card_data (`MMFTModelCardData`): what the training run knows.
        output_dir (`str` or `os.PathLike`): the model directory (created if missing).
        template_path (`str`, *optional*): a Jinja template to use instead of the packaged one.

    Returns:
        `huggingface_hub.ModelCard`: the saved card.
    """
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    rows = card_data.per_class_rows()
    plot_path = None
    if rows and plot_per_class_accuracy(rows, os.path.join(output_dir, PLOT_FILENAME)) is not None:
        plot_path = PLOT_FILENAME
    num_labels = len(card_data.labels) or len(rows) or "unknown"
    curve_columns, curve_rows = _wise_ft_table(card_data.wise_ft_curve, card_data.retention_dataset)
    card = ModelCard.from_template(
        card_data.to_hub_card_data(),
        template_path=os.fspath(template_path or TEMPLATE_PATH),
        title=card_data.resolved_model_name,
        model_id=card_data.model_id or DEFAULT_MODEL_ID,
        model_class=card_data.model_class,
        base_model_url=_hub_url(card_data.base_model),
        dataset_id=portable_reference(card_data.dataset_id)[0],
        dataset_url=_hub_url(card_data.dataset_id, datasets=True),
        domain=card_data.domain,
        captioner=card_data.captioner,
        caption_prompt=card_data.caption_prompt,
        caption_types=list(card_data.caption_types),
        supcon_weight=card_data.supcon_weight,
        num_shots=card_data.num_shots,
        seed=card_data.seed,
        num_labels=num_labels,
        lora_summary=_lora_summary(card_data.lora),
        eval_accuracy=card_data.eval_accuracy,
        eval_split=card_data.eval_split,
        per_class_rows=rows,
        plot_path=plot_path,
        remote_code=card_data.remote_code,
        adapter_only=card_data.adapter_only,
        prototype_source=card_data.prototype_source,
        prototype_description=PROTOTYPE_DESCRIPTIONS[card_data.prototype_source],
        wise_ft_alpha=card_data.wise_ft_alpha,
        wise_ft_columns=curve_columns,
        wise_ft_rows=curve_rows,
        wise_ft_plot=card_data.wise_ft_plot,
        retention_dataset=card_data.retention_dataset,
        retention_accuracy_before=card_data.retention_accuracy_before,
        retention_accuracy_after=card_data.retention_accuracy_after,
        hyperparameters=dict(card_data.hyperparameters),
        versions=_versions(),
    )
    card.save(os.path.join(output_dir, "README.md"))
    return card
