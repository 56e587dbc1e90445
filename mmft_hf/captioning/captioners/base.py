"""The captioner protocol: requests of (image, prompt) in, caption results out, in completion order.

A captioner knows nothing of CLIP, datasets or the caption cache. The pass engine (`captioning/engine.py`) owns the
cache, claims, resume, the quality gate, the ledger of submitted batches and the summary; a backend only turns
requests into answers: `Captioner` synchronously (transport, concurrency, retries), `BatchCaptioner` through a
provider's Batch API (request lines, uploads, batch status and result lines).
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
        max_tokens (`int`, *optional*): the answer's token limit for this request, overriding the captioner's own
            (`TokenLimitedCaptioner.max_tokens`): the engine raises it for an answer cut by the limit. `None` keeps
            the captioner's.
    """

    image: Image.Image
    prompt: str
    response_format: dict | None = None
    max_tokens: int | None = None


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
        processed (`bool`, defaults to `True`): whether the provider processed the request (and bills it, as its
            `usage` says): at least one attempt got an answer. `False` for a request that never left this machine
            (an unreadable image), a synchronous request none of whose attempts got an HTTP response (connection
            refused or reset, timed out) or a batch line the provider never ran (an expired batch's `batch_expired`
            lines). Summaries count only processed requests.
        unanswered (`int`, defaults to 0): attempts of this request that got no answer at all (connection errors,
            timeouts), among its `retries + 1` attempts; never processed, never billed.
        rejected (`list[str]`, defaults to `[]`): the quality gate's reasons for the answers to this request that the
            backend itself rejected and asked again (each one billed); counted in the summary's `rejected` with the
            final answer's own reason, if any (an `error` starting `"rejected: "`).
        max_tokens (`int`, *optional*): the token limit the (last) answer was generated under, when the backend
            has one; an answer cut by it is asked again with a raised limit (`quality.raised_token_limit`).
    """

    text: str | None
    error: str | None = None
    retries: int = 0
    usage: dict = field(default_factory=dict)
    finish_reason: str | None = None
    refusal: str | None = None
    processed: bool = True
    unanswered: int = 0
    rejected: list[str] = field(default_factory=list)
    max_tokens: int | None = None


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


@runtime_checkable
class TokenLimitedCaptioner(Captioner, Protocol):
    """A captioner whose answers stop at a token limit that one request may raise (`CaptionRequest.max_tokens`).

    An answer cut by the limit (`finish_reason="length"`) is asked again with the limit doubled, up to
    `quality.MAX_TOKEN_LIMIT_FACTOR` times `max_tokens` (`quality.raised_token_limit`), instead of being cut, and
    paid for, again. The raised limit is a per-request setting: the cache identity keeps the configured one.

    Attributes:
        max_tokens (`int`): the configured token limit of an answer.
    """

    max_tokens: int


@dataclass
class BatchStatus:
    """What a provider says of one submitted batch.

    Args:
        batch_id (`str`): the provider's batch id.
        status (`str`): the provider's status (`"in_progress"`, `"completed"`, `"expired"`, ...).
        ended (`bool`): whether the batch will not change any more (its result files are final).
        processed (`int`, defaults to 0): requests the provider has finished (completed or failed) so far.
        failed (`int`, defaults to 0): of those, the failed ones.
        result_files (`list[str]`): the ids of its output and error files, once it has ended.
        note (`str`, defaults to `""`): the provider's batch-level errors, if any.
    """

    batch_id: str
    status: str
    ended: bool
    processed: int = 0
    failed: int = 0
    result_files: list[str] = field(default_factory=list)
    note: str = ""


@runtime_checkable
class BatchCaptioner(Captioner, Protocol):
    """A backend that also answers whole files of requests through a provider's Batch API (at the batch price).

    The engine writes the request file (`request_line` per request, within `max_requests_per_batch` and
    `max_batch_file_bytes`), records it in the caption cache's ledger, then calls `upload_requests` and
    `start_batch`, polls `batch_status` every `poll_interval_s` seconds and reads `result_lines` once the batch has
    ended. The backend never touches the cache or the ledger. `caption` (synchronous) serves
    `retry_failed="sync"` passes.

    Attributes:
        poll_interval_s (`float`): the most seconds between two status checks.
        retry_failed (`str`): how later passes re-ask what failed: `"batch"` (a new batch) or `"sync"`.
        max_requests_per_batch (`int`), max_batch_file_bytes (`int`): the provider's per-batch limits.
    """

    poll_interval_s: float
    retry_failed: str
    max_requests_per_batch: int
    max_batch_file_bytes: int

    def batch_endpoint(self) -> str:
        """Where this backend's batches live (the API root): the ledger polls a batch only through this endpoint."""

    def request_line(self, custom_id: str, request: CaptionRequest) -> str:
        """One request line of a batch file (JSON, no newline) for `request`, answered under `custom_id`."""

    def upload_requests(self, path: str) -> str:
        """Uploads a request file; returns its file id."""

    def start_batch(self, file_id: str) -> str:
        """Returns the batch of an uploaded file: the one an interrupted run created for it, else a new one."""

    def batch_status(self, batch_id: str) -> BatchStatus:
        """The batch's current status."""

    def result_lines(self, status: BatchStatus) -> Iterator[str]:
        """The lines of an ended batch's output and error files."""

    def cancel_batch(self, batch_id: str) -> None:
        """Asks the provider to stop a batch (what it finished is still delivered and billed)."""
