"""Captions through an OpenAI-compatible Batch API (OpenAI, Gemini's OpenAI endpoint): half the price, no rate limit.

This backend speaks the Batch API and nothing else (`BatchCaptioner` in `base.py`): request lines (the same request
body the synchronous captioner sends), `files.create(purpose="batch")`, `batches.create`, `batches.retrieve` and the
output and error files. The pass engine (`captioning/engine.py`) writes the files, records every submission in the
caption cache *before* the batch exists, polls, stores each caption as it is read, and resumes an open batch after
a crash: nothing is submitted twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

from .base import (
    BatchStatus,
    CaptionerAuthenticationError,
    CaptionerConnectionError,
    CaptionerModelNotFoundError,
    CaptionerUnavailableError,
    CaptionRequest,
)
from .images import image_to_data_url, prepare_image
from .openai_compatible import OpenAICompatibleCaptioner

logger = logging.getLogger(__name__)

CHAT_COMPLETIONS_URL = "/v1/chat/completions"
TERMINAL_STATUSES = ("completed", "failed", "expired", "cancelled")
# OpenAI's documented limits per batch: 50,000 requests and a 200 MB input file. The default file size keeps a margin.
MAX_REQUESTS_PER_BATCH = 50_000
MAX_BATCH_FILE_BYTES = 190 * 1024 * 1024


class OpenAIBatchCaptioner(OpenAICompatibleCaptioner):
    """Captions images through the Batch API of an OpenAI-compatible provider, at the provider's batch price.

    Its captions are interchangeable with `OpenAICompatibleCaptioner`'s (same request body, same cache identity),
    so a run of either reuses what the other paid for. `caption(requests)` (the plain captioner protocol) sends
    requests synchronously; `caption_dataset` submits batches through the `BatchCaptioner` methods instead.

    A pass that ends with failures (per-line errors, an expired, cancelled or failed batch) keeps every caption
    that succeeded; what failed goes into the next pass of `caption_dataset`: a new batch (`retry_failed="batch"`)
    or synchronous requests (`retry_failed="sync"`). What still fails after `max_passes` is reported per row.

    Args:
        model, base_url, api_key_env, temperature, max_tokens, timeout, max_retries, max_image_side, image_format,
        extra_body, max_answer_retries, cache_tag, max_concurrency: as for `OpenAICompatibleCaptioner` (timeouts and
            retries apply to each file and batch call, concurrency and answer retries to synchronous requests).
        completion_window (`str`, defaults to `"24h"`): the batch's completion window (OpenAI accepts only `"24h"`).
        poll_interval_s (`float`, defaults to 30.0): the most seconds between two status checks of the open batches
            (the first checks come sooner: the wait grows with the time already waited).
        max_requests_per_batch (`int`, defaults to 50000): requests per batch (OpenAI's limit); more are split
            into several batches.
        max_batch_file_bytes (`int`, defaults to 190 MiB): the largest request file uploaded (OpenAI allows
            200 MB); more are split into several batches.
        retry_failed (`str`, defaults to `"batch"`): how later passes send what failed: `"batch"` or `"sync"`.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        *,
        completion_window: str = "24h",
        poll_interval_s: float = 30.0,
        max_requests_per_batch: int = MAX_REQUESTS_PER_BATCH,
        max_batch_file_bytes: int = MAX_BATCH_FILE_BYTES,
        retry_failed: str = "batch",
        **kwargs,
    ):
        super().__init__(model, base_url, api_key_env, **kwargs)
        if poll_interval_s < 0:
            raise ValueError(f"poll_interval_s must be >= 0 seconds, got {poll_interval_s}.")
        if not isinstance(max_requests_per_batch, int) or max_requests_per_batch < 1:
            raise ValueError(f"max_requests_per_batch must be a positive integer, got {max_requests_per_batch!r}.")
        if not isinstance(max_batch_file_bytes, int) or max_batch_file_bytes < 1:
            raise ValueError(f"max_batch_file_bytes must be a positive integer, got {max_batch_file_bytes!r}.")
        if retry_failed not in ("batch", "sync"):
            raise ValueError(f"retry_failed must be 'batch' or 'sync', got {retry_failed!r}.")
        self.completion_window = completion_window
        self.poll_interval_s = poll_interval_s
        self.max_requests_per_batch = max_requests_per_batch
        self.max_batch_file_bytes = max_batch_file_bytes
        self.retry_failed = retry_failed

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model={self.model!r}, base_url={self.base_url!r}, "
            f"api_key_env={self.api_key_env!r}, completion_window={self.completion_window!r}, "
            f"max_requests_per_batch={self.max_requests_per_batch}, retry_failed={self.retry_failed!r})"
        )

    def _client(self):
        from openai import OpenAI

        return OpenAI(
            api_key=self._api_key, base_url=self.base_url, timeout=self.timeout, max_retries=self.max_retries
        )

    def _call(self, method):
        """Runs `method(client)` on a fresh client; a files or batches call failing for good stops the run."""
        import openai

        client = self._client()
        try:
            return method(client)
        except openai.APIError as error:  # the Batch API cannot be used at all: one clear error, not a traceback
            raise self._unavailable(error) from None
        finally:
            client.close()

    def synchronous(self) -> OpenAICompatibleCaptioner:
        """The synchronous captioner with these settings (same cache identity): its answers come now, at full price."""
        return _with_settings_of(self, OpenAICompatibleCaptioner)

    # ------------------------------------------------------------------ BatchCaptioner protocol
    def batch_endpoint(self) -> str:
        return self.base_url or "https://api.openai.com/v1"

    def request_line(self, custom_id: str, request: CaptionRequest) -> str:
        url = image_to_data_url(prepare_image(request.image, self.max_image_side), self.image_format)
        body = self.request_body(request.prompt, url, request.response_format, request.max_tokens)
        line = {"custom_id": custom_id, "method": "POST", "url": CHAT_COMPLETIONS_URL, "body": body}
        return json.dumps(line, ensure_ascii=False)

    def upload_requests(self, path: str) -> str:
        def upload(client):
            with open(path, "rb") as handle:
                return client.files.create(file=handle, purpose="batch").id

        return self._call(upload)

    def start_batch(self, file_id: str, search: int = 1000) -> str:
        """Returns the batch of an uploaded file: the one an interrupted run created for it (among the account's
        newest `search` batches), else a new one."""

        def start(client):
            for index, batch in enumerate(client.batches.list(limit=100)):
                if batch.input_file_id == file_id:
                    return batch.id
                if index + 1 >= search:
                    break
            batch = client.batches.create(
                input_file_id=file_id,
                endpoint=CHAT_COMPLETIONS_URL,
                completion_window=self.completion_window,
                metadata={"created_by": "mmft-hf"},
            )
            return batch.id

        return self._call(start)

    def batch_status(self, batch_id: str) -> BatchStatus:
        batch = self._call(lambda client: client.batches.retrieve(batch_id))
        counts = batch.request_counts
        note = ""
        if batch.errors is not None and batch.errors.data:
            note = "; ".join(str(error.message) for error in batch.errors.data[:3])
        return BatchStatus(
            batch_id=batch.id,
            status=batch.status,
            ended=batch.status in TERMINAL_STATUSES,
            processed=(counts.completed + counts.failed) if counts is not None else 0,
            failed=counts.failed if counts is not None else 0,
            result_files=[file_id for file_id in (batch.output_file_id, batch.error_file_id) if file_id],
            note=note,
        )

    def result_lines(self, status: BatchStatus) -> Iterator[str]:
        for file_id in status.result_files:
            yield from self._call(lambda client, file_id=file_id: client.files.content(file_id).text).splitlines()

    def cancel_batch(self, batch_id: str) -> None:
        self._call(lambda client: client.batches.cancel(batch_id))

    def _unavailable(self, error) -> CaptionerUnavailableError:
        """The error to stop the run with when a files or batches call fails for good (after the SDK's retries)."""
        import openai

        where = self.base_url or "the OpenAI API"
        resume = "Batches already submitted are recorded in the caption cache; the same command polls them again."
        if isinstance(error, (openai.AuthenticationError, openai.PermissionDeniedError)):
            who = f"the key in ${self.api_key_env}" if self.api_key_env else "the placeholder key (api_key_env=None)"
            return CaptionerAuthenticationError(
                f"HTTP {error.status_code} from the Batch API at {where}: it rejected {who}; set "
                f"{self.api_key_env or 'api_key_env'} to a valid key with Batch API access."
            )
        if isinstance(error, openai.NotFoundError):
            return CaptionerModelNotFoundError(
                f"HTTP 404 from the Batch API at {where} ({error.message}). Servers without /v1/files and /v1/batches "
                "(vLLM's, for one) cannot take batches: export the requests for `vllm run-batch` "
                "(export_caption_requests, --export_requests) or caption synchronously (openai:MODEL)."
            )
        if isinstance(error, openai.APIStatusError):
            return CaptionerUnavailableError(
                f"HTTP {error.status_code} from the Batch API at {where}: {error.message}"
            )
        return CaptionerConnectionError(
            f"Cannot reach the Batch API at {where} ({type(error).__name__}: {error}). {resume}"
        )


def as_batch_captioner(captioner) -> OpenAIBatchCaptioner | None:
    """`captioner` speaking the Batch API (same settings and cache identity), or `None` when it cannot.

    A synchronous run finding its captions in an open batch (submitted by a batch run that stopped) polls that batch
    instead of paying for them again; an `OpenAICompatibleCaptioner` reaches the same provider's Batch API.
    """
    if isinstance(captioner, OpenAIBatchCaptioner):
        return captioner
    if isinstance(captioner, OpenAICompatibleCaptioner):
        poller = _with_settings_of(captioner, OpenAIBatchCaptioner)
        poller.completion_window, poller.poll_interval_s = "24h", 30.0
        poller.max_requests_per_batch, poller.max_batch_file_bytes = MAX_REQUESTS_PER_BATCH, MAX_BATCH_FILE_BYTES
        poller.retry_failed = "batch"
        return poller
    return None


def _with_settings_of(captioner: OpenAICompatibleCaptioner, cls: type):
    """A `cls` captioner with `captioner`'s settings and key, without reading the key's environment variable again."""
    twin = cls.__new__(cls)
    twin.__dict__.update(captioner.__dict__)
    return twin
