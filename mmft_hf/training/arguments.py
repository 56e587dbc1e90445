"""`MMFTTrainingArguments`: `TrainingArguments` with the MMFT options and the paper's defaults."""

import os
from dataclasses import dataclass, field

from transformers import TrainingArguments
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import (
    is_torch_cuda_available,
    is_torch_mps_available,
    is_torch_npu_available,
    is_torch_xpu_available,
    logging,
)

from ..captioning.sentences import CAPTION_SAMPLINGS

logger = logging.get_logger(__name__)

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
        caption_sampling (`str`, defaults to `"caption"`):
            With `text_source="captions"`: `"caption"` trains on one whole caption per fetch (MMFT); `"sentence"` on
            one sentence of one caption (DreamLIP-style, for long captions that CLIP's 77 tokens would cut). The
            class prototypes average the same units (each sentence with the template).
        template_probability (`float`, defaults to 0.0):
            Probability that a fetched row trains on the class template alone instead of template + caption
            (VeCLIP-style mixing; 0 is MMFT's texts, 1 FLYP's). The prototypes still average the captions.
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
        contrastive_chunk_size (`int`, *optional*):
            Embed the per-device batch in chunks of this many pairs (GradCache): a pass without the graph, the loss
            over the whole (gathered) batch, then each chunk again with gradients, with the memory of a
            `contrastive_chunk_size` batch. Without dropout, the same weights as the unchunked run within float
            rounding; with dropout (`lora_dropout` defaults to 0.1) masks are drawn per chunk, so the runs differ as
            two dropout draws do. Unset, or at least the batch size: one forward pass over the batch. See
            docs/large-batches.md.
        use_lora / lora_r / lora_alpha / lora_dropout / lora_target_modules:
            LoRA through peft on both towers (`q_proj`, `k_proj`, `v_proj`, `out_proj` by default). The final
            `save_model` writes the merged plain model; checkpoints hold the adapter.
        overwrite_output_dir (`bool`, defaults to `False`):
            Train from scratch into a non-empty `output_dir` instead of resuming its last checkpoint (see
            `resolve_resume_checkpoint`; transformers 5 dropped this flag from `TrainingArguments`).
        load_best_model_at_end (`bool`, *optional*):
            Unset: on (the paper's best-epoch selection) whenever evaluation and saving run at the same interval;
            off, with one info line, when `eval_strategy` or `save_strategy` is `"no"` or they differ.
        dataloader_num_workers / dataloader_pin_memory / dataloader_persistent_workers (*optional*):
            Unset: chosen for the machine (`dataloader_defaults`): with an accelerator, worker processes scaled
            to the CPUs per process, persistent, and pinned memory on CUDA; on a CPU-only run 0 workers (the
            training threads already use every core) and no pinned memory.
    """

    supcon_weight: float = field(default=0.1, metadata={"help": "w in w*L_supcon + (1-w)*L_clip (0 = FLYP)."})
    class_template: str | None = field(
        default="a photo of a {}.", metadata={"help": "Prefix before each caption; {} is the class name."}
    )
    text_source: str = field(
        default="captions", metadata={"help": f"Training texts, one of {TEXT_SOURCES}.", "choices": TEXT_SOURCES}
    )
    caption_sampling: str = field(
        default="caption",
        metadata={
            "help": "Training unit drawn from a row's captions: 'caption' (a whole caption, MMFT) or 'sentence' (one "
            "sentence of a caption, for long captions); the class prototypes average the same units.",
            "choices": CAPTION_SAMPLINGS,
        },
    )
    template_probability: float = field(
        default=0.0,
        metadata={"help": "Probability that a row trains on the class template alone instead of template + caption "
                  "(0 = MMFT, 1 = FLYP's texts)."},
    )  # fmt: skip
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
    contrastive_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Embed each per-device batch in chunks of this many pairs with cached gradients (GradCache): the "
            "contrastive batch stays per_device_train_batch_size x processes, the memory is that of one chunk."
        },
    )
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"],
        metadata={"help": "Module names LoRA wraps (both towers)."},
    )

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train from scratch into a non-empty output_dir instead of resuming its last checkpoint."},
    )
    load_best_model_at_end: bool | None = field(
        default=None,
        metadata={"help": "Reload the best checkpoint at the end. Default: on when evaluation and saving run at "
                  "the same interval, else off."},
    )  # fmt: skip
    dataloader_num_workers: int | None = field(
        default=None,
        metadata={"help": "DataLoader worker processes. Default: scaled to the CPUs with an accelerator, 0 on CPU."},
    )
    dataloader_pin_memory: bool | None = field(
        default=None, metadata={"help": "Pinned memory for host-to-device copies. Default: on with CUDA only."}
    )
    dataloader_persistent_workers: bool | None = field(
        default=None, metadata={"help": "Keep worker processes between epochs. Default: on when there are workers."}
    )

    # Paper defaults (method.md §6) and the settings a Trainer over image/caption rows needs.
    learning_rate: float = 1e-5
    weight_decay: float = field(
        default=1e-4,  # transformers' help says biases and norms are exempt: here they are not, by default
        metadata={"help": "AdamW weight decay, on every parameter unless --weight_decay_all_parameters false."},
    )
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0
    optim: str = "adamw_torch"
    num_train_epochs: float = 50
    per_device_train_batch_size: int = 64
    per_device_eval_batch_size: int = 256
    eval_strategy: str = "epoch"
    save_strategy: str = "epoch"
    save_total_limit: int | None = 2
    metric_for_best_model: str | None = "accuracy"
    greater_is_better: bool | None = True
    remove_unused_columns: bool = False
    label_names: list[str] | None = field(default_factory=lambda: ["labels"])
    ddp_find_unused_parameters: bool | None = False
    logging_steps: float = 10

    def __post_init__(self):
        self._resolve_best_model_selection()
        defaults = dataloader_defaults(self.use_cpu)
        for name in ("dataloader_num_workers", "dataloader_pin_memory"):
            if getattr(self, name) is None:
                setattr(self, name, defaults[name])
        if self.dataloader_persistent_workers is None:  # torch refuses persistent workers without workers
            self.dataloader_persistent_workers = self.dataloader_num_workers > 0
        super().__post_init__()
        if not 0.0 <= self.supcon_weight <= 1.0:
            raise ValueError(f"supcon_weight must be in [0, 1], got {self.supcon_weight}.")
        if self.text_source not in TEXT_SOURCES:
            raise ValueError(f"text_source must be one of {TEXT_SOURCES}, got {self.text_source!r}.")
        if self.caption_sampling not in CAPTION_SAMPLINGS:
            raise ValueError(f"caption_sampling must be one of {CAPTION_SAMPLINGS}, got {self.caption_sampling!r}.")
        if not 0.0 <= self.template_probability <= 1.0:
            raise ValueError(f"template_probability must be in [0, 1], got {self.template_probability}.")
        if self.prototype_source not in PROTOTYPE_SOURCES:
            raise ValueError(f"prototype_source must be one of {PROTOTYPE_SOURCES}, got {self.prototype_source!r}.")
        if self.class_template in ("", "none", "None"):  # how a command line says "no template"
            self.class_template = None
        if self.class_template is not None and "{}" not in self.class_template:
            raise ValueError(f"class_template must contain '{{}}' for the class name, got {self.class_template!r}.")
        if self.template_probability > 0 and self.class_template is None:
            raise ValueError(
                f"template_probability={self.template_probability} trains some rows on the class template alone, "
                "but class_template is None; set a class_template or template_probability 0."
            )
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ValueError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}.")
        if self.contrastive_chunk_size is not None and self.contrastive_chunk_size < 1:
            raise ValueError(
                f"contrastive_chunk_size must be a positive number of pairs, got {self.contrastive_chunk_size}; "
                "leave it unset to embed each batch in one pass."
            )
        if self.remove_unused_columns:
            raise ValueError(
                "MMFTTrainer needs remove_unused_columns=False: the collator reads the image, label and caption "
                "columns, which CLIPModel.forward does not name."
            )

    def _resolve_best_model_selection(self) -> None:
        """Keeps the paper's best-epoch selection wherever evaluation and saving allow it; off otherwise."""
        if self.load_best_model_at_end is not None:
            return
        evaluation = str(getattr(self.eval_strategy, "value", self.eval_strategy))
        saving = str(getattr(self.save_strategy, "value", self.save_strategy))
        self.load_best_model_at_end = "no" not in (evaluation, saving) and saving in (evaluation, "best")
        if not self.load_best_model_at_end:
            logger.info(
                f"eval_strategy={evaluation!r} and save_strategy={saving!r}: the best epoch cannot be selected, so "
                "the model of the last step is kept (load_best_model_at_end=False)."
            )


def _accelerator_available() -> bool:
    return any(check() for check in (is_torch_cuda_available, is_torch_xpu_available, is_torch_npu_available)) or (
        is_torch_mps_available()
    )


def dataloader_defaults(use_cpu: bool = False, cpus: int | None = None, processes_per_node: int | None = None) -> dict:
    """DataLoader settings that keep an accelerator fed without slowing a CPU-only run.

    Images are decoded, cropped and normalised in the DataLoader (a few hundred images/s per process), while one
    modern GPU trains thousands per second: with an accelerator, `min(8, cpus_per_process - 1)` worker processes
    (at least 1), kept alive between epochs, and pinned memory on CUDA. On a CPU-only run the training threads
    already use every core, so the data is prepared in the training process (0 workers), without pinned memory
    (which only warns there).

    Args:
        use_cpu (`bool`, defaults to `False`): the run ignores any accelerator.
        cpus (`int`, *optional*): CPUs this process may use; defaults to its CPU affinity.
        processes_per_node (`int`, *optional*): training processes on this machine; defaults to `LOCAL_WORLD_SIZE`
            (set by torchrun and accelerate), else 1.

    Returns:
        `dict` with `dataloader_num_workers`, `dataloader_pin_memory` and `dataloader_persistent_workers`.
    """
    if use_cpu or not _accelerator_available():
        return {"dataloader_num_workers": 0, "dataloader_pin_memory": False, "dataloader_persistent_workers": False}
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes_per_node = processes_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = max(1, min(8, cpus // max(processes_per_node, 1) - 1))
    return {
        "dataloader_num_workers": workers,
        "dataloader_pin_memory": is_torch_cuda_available(),
        "dataloader_persistent_workers": True,
    }


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The `checkpoint-<step>` folder of `output_dir` with the highest step whose `trainer_state.json` (written last
    by `Trainer`) reads back; a folder left incomplete by a run killed while saving it is skipped with a warning.

    Args:
        output_dir (`str`): a training output directory.

    Returns:
        `str` or `None`: the checkpoint's path, `None` when there is none.
    """
    if not os.path.isdir(output_dir):
        return None
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    steps = sorted(
        (int(name[len(prefix) :]) for name in os.listdir(output_dir) if name.startswith(prefix)
         and name[len(prefix) :].isdigit() and os.path.isdir(os.path.join(output_dir, name))),
        reverse=True,
    )  # fmt: skip
    for step in steps:
        path = os.path.join(output_dir, f"{prefix}{step}")
        try:
            TrainerState.load_from_json(os.path.join(path, "trainer_state.json"))
        except (OSError, ValueError):
            logger.warning(f"{path} is incomplete (its trainer_state.json does not read back): skipping it.")
            continue
        return path
    return None


def resolve_resume_checkpoint(args: TrainingArguments, overwrite_output_dir: bool | None = None) -> str | None:
    """The checkpoint a training command resumes from, decided as transformers' example scripts decide it.

    - `--resume_from_checkpoint PATH`: that checkpoint (it must exist).
    - `--resume_from_checkpoint true` (or `last`): the last complete `checkpoint-*` in `output_dir` (one must
      exist; see `last_complete_checkpoint`).
    - no flag, `output_dir` holds checkpoints: the last one, with an info line (add `--overwrite_output_dir` to
      start from scratch instead).
    - no flag, `output_dir` not empty but without checkpoints: an error asking for `--overwrite_output_dir` or
      another `--output_dir`, so that no finished run is overwritten by accident.

    Args:
        args (`TrainingArguments`): reads `output_dir` and `resume_from_checkpoint`.
        overwrite_output_dir (`bool`, *optional*): defaults to `args.overwrite_output_dir` when it has one.

    Returns:
        `str` or `None`: the checkpoint directory to pass to `trainer.train(resume_from_checkpoint=...)`.
    """
    if overwrite_output_dir is None:
        overwrite_output_dir = getattr(args, "overwrite_output_dir", False)
    output_dir, requested = args.output_dir, args.resume_from_checkpoint
    if isinstance(requested, str) and requested.lower() in ("false", "no", "none", ""):
        requested = None
    if requested is not None:
        if requested is True or str(requested).lower() in ("true", "last", "yes"):
            last = last_complete_checkpoint(output_dir)
            if last is None:
                raise ValueError(
                    f"--resume_from_checkpoint {requested}: there is no checkpoint-* folder in --output_dir "
                    f"{output_dir!r} to resume from. Name a checkpoint folder, or drop the flag to start a new run."
                )
            return last
        if not os.path.isdir(requested):
            raise ValueError(f"--resume_from_checkpoint {requested!r}: no such checkpoint folder.")
        return requested
    if overwrite_output_dir or not os.path.isdir(output_dir) or not os.listdir(output_dir):
        return None
    last = last_complete_checkpoint(output_dir)
    if last is None:
        raise ValueError(
            f"--output_dir {output_dir!r} already exists, is not empty and holds no checkpoint to resume from. Use "
            "--overwrite_output_dir to train into it from scratch, or choose another --output_dir."
        )
    logger.info(
        f"Checkpoint found: resuming training from {last}. To start from scratch instead, choose another "
        "--output_dir or add --overwrite_output_dir."
    )
    return last
