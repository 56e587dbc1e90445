"""`MMFTTrainingArguments`: `TrainingArguments` with the MMFT options and the paper's defaults."""

from dataclasses import dataclass, field

from transformers import TrainingArguments

TEXT_SOURCES = ("captions", "class_name", "templates")
PROTOTYPE_SOURCES = ("captions", "single_template", "ensemble")


@dataclass
class MMFTTrainingArguments(TrainingArguments):
    """`transformers.TrainingArguments` plus the MMFT options.

    The defaults follow the MMFT reference recipe (method.md §6): AdamW (`adamw_torch`), learning rate 1e-5,
    weight decay 1e-4 on **all** parameters, a cosine schedule stepped per optimiser step down to 0 with no warm-up,
    batch 64 for training and 256 for evaluation, 50 epochs, evaluation and a checkpoint after every epoch, and the
    best epoch by validation accuracy (strict improvement) reloaded at the end. They also set what a Trainer
    subclass over image/caption rows needs: `remove_unused_columns=False` and `label_names=["labels"]`.

    Args:
        supcon_weight (`float`, defaults to 0.1):
            `w` in `w * L_supcon + (1 - w) * L_clip`. `0` is plain CLIP loss (FLYP), `1` SupCon only.
        class_template (`str`, *optional*, defaults to `"a photo of a {}."`):
            Prefix put before every caption, `{}` being the class name, in training and in the class prototypes.
            `None` trains on bare captions.
        text_source (`str`, defaults to `"captions"`):
            Training texts: `"captions"` (MMFT: one random caption per fetch), `"class_name"` (FLYP: the class
            template alone) or `"templates"` (FLYP-ens: one of OpenAI's 80 templates per fetch).
        prototype_source (`str`, defaults to `"captions"`):
            Classifier used for evaluation: `"captions"` (class-averaged training captions, MMFT),
            `"single_template"` (`"a photo of a {}"`) or `"ensemble"` (OpenAI's 80 templates).
        fallback_template (`str`, defaults to `"a photo of a {}"`):
            Prototype text of a class that has no training captions.
        image_column / label_column / caption_column (`str`):
            Dataset column names (defaults `"image"`, `"label"`, `"captions"`).
        crop_scale_min (`float`, defaults to 0.9):
            Lower bound of the RandomResizedCrop area scale used as training augmentation (upper bound 1.0).
        prototype_batch_size (`int`, defaults to 256):
            Texts encoded per forward pass when building class prototypes.
        weight_decay_all_parameters (`bool`, defaults to `True`):
            Decay biases and LayerNorm weights too, as the reference does (Trainer exempts them otherwise).
        use_lora / lora_r / lora_alpha / lora_dropout / lora_target_modules:
            LoRA through peft on both towers (`q_proj`, `k_proj`, `v_proj`, `out_proj` by default). The final
            `save_model` writes the merged plain model; checkpoints hold the adapter.
    """

    supcon_weight: float = field(default=0.1, metadata={"help": "w in w*L_supcon + (1-w)*L_clip (0 = FLYP)."})
    class_template: str | None = field(
        default="a photo of a {}.", metadata={"help": "Prefix before each caption; {} is the class name."}
    )
    text_source: str = field(
        default="captions", metadata={"help": f"Training texts, one of {TEXT_SOURCES}.", "choices": TEXT_SOURCES}
    )
    prototype_source: str = field(
        default="captions",
        metadata={"help": f"Evaluation classifier, one of {PROTOTYPE_SOURCES}.", "choices": PROTOTYPE_SOURCES},
    )
    fallback_template: str = field(
        default="a photo of a {}", metadata={"help": "Prototype text for a class without captions."}
    )
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding the ClassLabel labels."})
    caption_column: str = field(default="captions", metadata={"help": "Column holding the list of captions."})
    crop_scale_min: float = field(default=0.9, metadata={"help": "Lower area scale of the training crop."})
    prototype_batch_size: int = field(default=256, metadata={"help": "Texts per batch when building prototypes."})
    weight_decay_all_parameters: bool = field(
        default=True, metadata={"help": "Apply weight decay to biases and norms too (MMFT reference)."}
    )
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"],
        metadata={"help": "Module names LoRA wraps (both towers)."},
    )

    # Paper defaults (method.md §6) and the settings a Trainer over image/caption rows needs.
    learning_rate: float = 1e-5
    weight_decay: float = 1e-4
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0
    optim: str = "adamw_torch"
    num_train_epochs: float = 50
    per_device_train_batch_size: int = 64
    per_device_eval_batch_size: int = 256
    eval_strategy: str = "epoch"
    save_strategy: str = "epoch"
    save_total_limit: int | None = 2
    load_best_model_at_end: bool = True
    metric_for_best_model: str | None = "accuracy"
    greater_is_better: bool | None = True
    remove_unused_columns: bool = False
    label_names: list[str] | None = field(default_factory=lambda: ["labels"])
    ddp_find_unused_parameters: bool | None = False
    logging_steps: float = 10

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.supcon_weight <= 1.0:
            raise ValueError(f"supcon_weight must be in [0, 1], got {self.supcon_weight}.")
        if self.text_source not in TEXT_SOURCES:
            raise ValueError(f"text_source must be one of {TEXT_SOURCES}, got {self.text_source!r}.")
        if self.prototype_source not in PROTOTYPE_SOURCES:
            raise ValueError(f"prototype_source must be one of {PROTOTYPE_SOURCES}, got {self.prototype_source!r}.")
        if self.class_template in ("", "none", "None"):  # how a command line says "no template"
            self.class_template = None
        if self.class_template is not None and "{}" not in self.class_template:
            raise ValueError(f"class_template must contain '{{}}' for the class name, got {self.class_template!r}.")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ValueError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}.")
        if self.remove_unused_columns:
            raise ValueError(
                "MMFTTrainer needs remove_unused_columns=False: the collator reads the image, label and caption "
                "columns, which CLIPModel.forward does not name."
            )
