"""Caption backends behind one protocol: (image, prompt) requests in, caption results out in completion order.

Backends import their heavy dependencies (`openai`, `transformers`, `torch`) lazily, so importing this package is
cheap: `TransformersCaptioner` (whose module needs torch) is loaded on first use.
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


def __getattr__(name: str):
    if name == "TransformersCaptioner":
        from .transformers_vlm import TransformersCaptioner

        return TransformersCaptioner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
