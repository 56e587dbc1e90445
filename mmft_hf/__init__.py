"""mmft-hf: MultiModal Fine-Tuning (MMFT) with synthetic captions for the Hugging Face stack."""

from .prototypes import (
    OPENAI_IMAGENET_TEMPLATES,
    build_class_prototypes,
    load_class_prototypes,
    save_class_prototypes,
    zero_shot_prototypes,
)

__version__ = "0.1.0"
