"""mmft-hf: MultiModal Fine-Tuning (MMFT) with synthetic captions for the Hugging Face stack.

Importing the package registers the `"mmft-classification"` pipeline task with transformers.
"""

from .captioning.builder import PRESETS, CaptionedImages, CaptionedImagesConfig, push_captioned
from .captioning.cache import CaptionCacheError
from .captioning.caption import (
    CaptioningError,
    CaptioningInterrupted,
    CaptioningSummary,
    caption_dataset,
    caption_provenance,
    merge_caption_shards,
)
from .captioning.captioners import (
    CaptionerAuthenticationError,
    CaptionerConnectionError,
    CaptionerModelNotFoundError,
    CaptionerUnavailableError,
    CaptionRequest,
    CaptionResult,
    OpenAIBatchCaptioner,
    OpenAICompatibleCaptioner,
    TransformersCaptioner,
)
from .captioning.offline import export_caption_requests, import_caption_results
from .captioning.prompts import CAPTION_TYPES, DOMAINS, PROMPT_TEMPLATE, build_prompt, normalize_class_name
from .captioning.stats import caption_stats, clip_score, dataset_clip_score, estimate_captioning_cost
from .classification import pipeline  # registers the "mmft-classification" pipeline task
from .classification.class_texts import class_texts_from_captions, prototypes_from_captioned_dataset
from .classification.pipeline import MMFTClassificationPipeline
from .classification.prototypes import (
    OPENAI_IMAGENET_TEMPLATES,
    build_class_prototypes,
    load_class_prototypes,
    save_class_prototypes,
    zero_shot_prototypes,
)
from .model_card import MMFTModelCardData, create_model_card
from .publishing import publish, save_for_hub
from .training.arguments import MMFTTrainingArguments
from .training.collator import MMFTDataCollator
from .training.data import (
    align_label_names,
    empty_caption_rows,
    random_resized_crop,
    sample_few_shot,
    train_validation_split,
    validate_captioned_dataset,
)
from .training.distributed import gather_batch, global_logits
from .training.losses import clip_loss, mmft_loss, supcon_loss
from .training.trainer import MMFTTrainer
from .training.wise_ft import wise_ft
from .version import __version__
