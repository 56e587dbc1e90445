"""Caption backends behind one protocol: (image, prompt) requests in, caption results out in completion order.

Backends import their heavy dependencies (`openai`, `transformers`) lazily, so importing this package is cheap.
"""

from .base import (
    Captioner,
    CaptionerAuthenticationError,
    CaptionerConnectionError,
    CaptionerModelNotFoundError,
    CaptionerNotAnsweringError,
    CaptionerServerError,
    CaptionerUnavailableError,
    CaptionRequest,
    CaptionResult,
)
from .images import image_to_data_url, prepare_image, strip_thinking
from .openai_batch import OpenAIBatchCaptioner
from .openai_compatible import OpenAICompatibleCaptioner
from .transformers_vlm import TransformersCaptioner

__all__ = [
    "CaptionRequest",
    "CaptionResult",
    "Captioner",
    "CaptionerAuthenticationError",
    "CaptionerConnectionError",
    "CaptionerModelNotFoundError",
    "CaptionerNotAnsweringError",
    "CaptionerServerError",
    "CaptionerUnavailableError",
    "OpenAIBatchCaptioner",
    "OpenAICompatibleCaptioner",
    "TransformersCaptioner",
    "image_to_data_url",
    "prepare_image",
    "strip_thinking",
]
