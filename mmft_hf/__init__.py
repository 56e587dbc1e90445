"""mmft-hf: MultiModal Fine-Tuning (MMFT) with synthetic captions for the Hugging Face stack."""

from .collator import MMFTDataCollator
from .data import (
    empty_caption_rows,
    random_resized_crop,
    sample_few_shot,
    train_validation_split,
    validate_captioned_dataset,
)
from .losses import clip_loss, mmft_loss, supcon_loss
from .prototypes import (
    OPENAI_IMAGENET_TEMPLATES,
    build_class_prototypes,
    load_class_prototypes,
    save_class_prototypes,
    zero_shot_prototypes,
)
from .trainer import MMFTTrainer
from .training_args import MMFTTrainingArguments

__version__ = "0.1.0"
