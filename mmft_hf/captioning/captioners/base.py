"""The captioner protocol: requests of (image, prompt) in, caption results out, in completion order.

A captioner knows nothing of CLIP or datasets. `caption_dataset` (captioning.py) owns the cache, resume and
provenance; a backend owns transport, batching, concurrency and retries.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from PIL import Image


class CaptionerUnavailableError(RuntimeError):
    """The backend cannot answer any request (unreachable, rejected credentials, unknown model): stop the run.

    Backends raise it instead of failing request after request; `caption_dataset` lets it propagate (every
    caption finished before it is cached) and adds where the cache is and how to resume.
    """


class CaptionerConnectionError(CaptionerUnavailableError):
    """The server cannot be reached (connection refused or reset, DNS failure), or stopped answering."""


class CaptionerNotAnsweringError(CaptionerConnectionError):
    """The server accepts connections but does not answer within the request timeout (hung, or overloaded)."""


class CaptionerServerError(CaptionerUnavailableError):
    """The server answers, but only with errors: a storm of HTTP 5xx, or HTTP 429 beyond its `Retry-After` budget."""


class CaptionerAuthenticationError(CaptionerUnavailableError):
    """The API rejected the credentials (HTTP 401/403). Raised at once: a wrong key is not a per-image failure."""


class CaptionerModelNotFoundError(CaptionerUnavailableError):
    """The server does not serve the requested model (HTTP 404), or the API root is wrong."""


@dataclass
class CaptionRequest:
    """One caption to write: an image and the full prompt text.

    Args:
        image (`PIL.Image.Image`): the image.
        prompt (`str`): the full prompt text.
        response_format (`dict`, *optional*): an OpenAI-style `response_format` (e.g. a JSON schema) for backends
            that support it; others ignore it (one-request-per-image captioning parses the reply either way).
    """

    image: Image.Image
    prompt: str
    response_format: dict | None = None


@dataclass
class CaptionResult:
    """The outcome of one request.

    Args:
        text (`str`, *optional*): the caption, or `None` when the request failed after its retries.
        error (`str`, *optional*): why it failed (never set together with `text`).
        retries (`int`, defaults to 0): extra attempts made for this request.
        usage (`dict`, *optional*): token counts reported by the backend (e.g. `prompt_tokens`).
        finish_reason (`str`, *optional*): the answer's `finish_reason` (`"stop"`, `"length"`, ...), `None` when the
            backend does not say; read by the quality gate (`captioning/quality.py`).
        refusal (`str`, *optional*): the model's refusal message (OpenAI's `message.refusal`), if any.
    """

    text: str | None
    error: str | None = None
    retries: int = 0
    usage: dict = field(default_factory=dict)
    finish_reason: str | None = None
    refusal: str | None = None


@runtime_checkable
class Captioner(Protocol):
    """What `caption_dataset` needs from a backend."""

    def cache_identity(self) -> dict:
        """JSON-serialisable identity: backend, model and every generation setting that changes the output.

        It is part of the cache key, so two captioners with the same identity share cached captions. It must
        never contain secrets such as API keys.
        """

    def caption(self, requests: Sequence[CaptionRequest]) -> Iterator[tuple[int, CaptionResult]]:
        """Captions `requests`, yielding `(index into requests, result)` as each finishes (any order).

        Yielding as soon as a caption is ready lets the caller persist it at once, so an interrupted run loses
        nothing that finished.
        """
