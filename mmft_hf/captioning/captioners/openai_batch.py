"""Captions through an OpenAI-compatible Batch API (OpenAI, Gemini's OpenAI endpoint): half the price, no rate limit.

`caption_dataset` hands this captioner every missing caption of a pass at once. It writes them as Batch API JSONL
(the same request body the synchronous captioner sends; `custom_id` = the cache key), uploads the file with
`files.create(purpose="batch")`, creates the batch, and records both in the caption cache *before* waiting. Then it
polls with a progress bar, downloads the output and error files when the batch ends, and `caption_dataset` commits
each caption as it is read. A run killed while waiting (even with SIGKILL) and started again polls the same batch:
nothing is submitted twice.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator

from tqdm.auto import tqdm

from ...images import IMAGE_DECODE_ERRORS
from .base import (
    CaptionerAuthenticationError,
    CaptionerConnectionError,
    CaptionerModelNotFoundError,
    CaptionerUnavailableError,
    CaptionResult,
)
from .openai_compatible import OpenAICompatibleCaptioner

logger = logging.getLogger(__name__)

BATCH_KIND = "openai-batch"
TERMINAL_STATUSES = ("completed", "failed", "expired", "cancelled")
# OpenAI's documented limits per batch: 50,000 requests and a 200 MB input file. The default file size keeps a margin.
MAX_REQUESTS_PER_BATCH = 50_000
MAX_BATCH_FILE_BYTES = 190 * 1024 * 1024


class OpenAIBatchCaptioner(OpenAICompatibleCaptioner):
    """Captions images through the Batch API of an OpenAI-compatible provider, at the provider's batch price.

    Its captions are interchangeable with `OpenAICompatibleCaptioner`'s (same request body, same cache identity),
    so a run of either reuses what the other paid for. `caption(requests)` (the plain captioner protocol) sends
    requests synchronously; `caption_dataset` uses `submit_and_collect` instead.

    A pass that ends with failures (per-line errors, an expired, cancelled or failed batch) keeps every caption
    that succeeded; what failed goes into the next pass of `caption_dataset`: a new batch (`retry_failed="batch"`)
    or synchronous requests (`retry_failed="sync"`). What still fails after `max_passes` is reported per row.

    Args:
        model, base_url, api_key_env, temperature, max_tokens, timeout, max_retries, max_image_side, image_format,
        extra_body, max_answer_retries, cache_tag, max_concurrency: as for `OpenAICompatibleCaptioner` (timeouts and
            retries apply to each file and batch call, concurrency and answer retries to synchronous requests).
        completion_window (`str`, defaults to `"24h"`): the batch's completion window (OpenAI accepts only `"24h"`).
        poll_interval_s (`float`, defaults to 30.0): seconds between two status checks of the open batches.
        max_requests_per_batch (`int`, defaults to 50000): requests per batch (OpenAI's limit); more are split
            into several batches.
        max_batch_file_bytes (`int`, defaults to 190 MiB): the largest request file uploaded (OpenAI allows
            200 MB); more are split into several batches.
        retry_failed (`str`, defaults to `"batch"`): how later passes send what failed: `"batch"` or `"sync"`.
    """

    submits_batches = True

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

    def submit_and_collect(
        self, units: list, load_image: Callable, ledger, show_progress: bool = True, claim: Callable | None = None
    ) -> Iterator[tuple[str, CaptionResult]]:
        """Submits the units no open batch holds yet, waits for every batch holding one, yields their results.

        Open batches recorded in the cache (by an earlier, interrupted run) that hold any of the units are polled
        instead of submitting those units again. Results are yielded as each batch's files are read, including
        lines of an adopted batch that this call did not ask for (the caller stores them too: they are paid for).

        Args:
            units (`list[RequestUnit]`): the requests of this pass (see `mmft_hf.captioning.scale`).
            load_image (`Callable[[int], PIL.Image.Image]`): loads a unit's row image; raises if unreadable.
            ledger (`SubmissionLedger`): the cache's submission tables.
            show_progress (`bool`, defaults to `True`): show a progress bar.
            claim (`Callable[[list], list]`, *optional*): claims the units about to be submitted in the cache and
                returns those granted; the others (another live run is making them) are not submitted and get no
                result here.

        Yields:
            `tuple[str, CaptionResult]`: the `custom_id` and its result.
        """
        import openai

        from ..batch_files import CHAT_COMPLETIONS_URL

        client = self._client()
        try:
            wanted = {unit.custom_id for unit in units}
            tracked = [
                submission
                for submission in ledger.open_submissions(BATCH_KIND)
                if submission["custom_ids"] & wanted and submission["info"].get("base_url") == self.base_url
            ]
            covered = set().union(*(submission["custom_ids"] for submission in tracked))
            if tracked:
                logger.info(
                    "Resuming %d open batch(es) recorded in the cache (%d requests); not submitting those again.",
                    len(tracked),
                    len(covered),
                )
            to_send = [unit for unit in units if unit.custom_id not in covered]
            if claim is not None:
                to_send = claim(to_send)
            for path, records, failures in self._write_request_files(to_send, load_image):
                yield from failures
                if path is None:
                    continue
                try:
                    with open(path, "rb") as handle:
                        uploaded = client.files.create(file=handle, purpose="batch")
                finally:
                    os.remove(path)
                info = {"base_url": self.base_url, "model": self.model, "requests": len(records)}
                ledger.record(uploaded.id, BATCH_KIND, records, info)  # recorded before the batch exists
                submission = {"id": uploaded.id, "remote_id": None, "info": info, "custom_ids": set(records)}
                submission["remote_id"] = self._create_batch(client, uploaded.id, CHAT_COMPLETIONS_URL)
                ledger.set_remote_id(uploaded.id, submission["remote_id"])
                tracked.append(submission)
            for submission in tracked:
                if submission["remote_id"] is None:  # an earlier run stopped between upload and batch creation
                    found = self._find_batch(client, submission["id"])
                    submission["remote_id"] = found or self._create_batch(
                        client, submission["id"], CHAT_COMPLETIONS_URL
                    )
                    ledger.set_remote_id(submission["id"], submission["remote_id"])
            yield from self._wait_and_read(client, tracked, ledger, show_progress)
        except openai.APIError as error:  # the Batch API cannot be used at all: one clear error, not a traceback
            raise self._unavailable(error, ledger.path) from None
        finally:
            client.close()

    def _write_request_files(self, units: list, load_image: Callable):
        """Writes the units as JSONL files within the per-batch limits; yields (path, records, failures) per file.

        `records` maps each written `custom_id` to its unit record; `failures` are the units that could not be
        written (unreadable image, request too large); `path` is `None` when only failures are left.
        """
        from ..batch_files import not_sent, request_line

        handle, path, records, size, failures = None, None, {}, 0, []
        images: dict = {}
        try:
            for unit in units:
                if unit.row not in images:
                    images.clear()  # units come row by row: keep one decoded image at a time
                    try:
                        images[unit.row] = load_image(unit.row)
                    except IMAGE_DECODE_ERRORS as error:  # unreadable image: this unit fails, the batch goes on
                        images[unit.row] = f"the image cannot be read ({type(error).__name__}: {error})"
                if isinstance(images[unit.row], str):
                    failures.append((unit.custom_id, not_sent(images[unit.row])))
                    continue
                line = request_line(self, unit.custom_id, images[unit.row], unit.prompt, unit.response_format)
                data = (line + "\n").encode("utf-8")
                if len(data) > self.max_batch_file_bytes:
                    error = f"the request is {len(data)} bytes, over max_batch_file_bytes={self.max_batch_file_bytes}"
                    failures.append((unit.custom_id, not_sent(error + "; lower max_image_side")))
                    continue
                if handle is not None and (
                    len(records) >= self.max_requests_per_batch or size + len(data) > self.max_batch_file_bytes
                ):
                    handle.close()
                    yield path, records, failures
                    handle, records, size, failures = None, {}, 0, []
                if handle is None:
                    descriptor, path = tempfile.mkstemp(prefix="mmft-hf-batch-", suffix=".jsonl")
                    handle = os.fdopen(descriptor, "wb")
                handle.write(data)
                size += len(data)
                records[unit.custom_id] = unit.record
            if handle is not None:
                handle.close()
            if handle is not None or failures:
                yield (path if handle is not None else None), records, failures
        finally:
            if handle is not None and not handle.closed:
                handle.close()
                os.remove(path)

    def _unavailable(self, error, cache_path: str) -> CaptionerUnavailableError:
        """The error to stop the run with when a files or batches call fails for good (after the SDK's retries)."""
        import openai

        where = self.base_url or "the OpenAI API"
        resume = f"Batches already submitted are recorded in {cache_path}; the same command polls them again."
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

    def cancel_open_batches(self, cache_dir: str | None = None) -> list[str]:
        """Asks the provider to cancel every batch of this API that the caption cache records as open.

        Use it to stop paying for a submission you no longer want. What the batches finished before the
        cancellation is still paid for: the next `caption_dataset` run reads it (and stores it) as usual, and
        requests only what is then missing.

        Args:
            cache_dir (`str`, *optional*): the caption cache (see `caption_dataset`).

        Returns:
            `list[str]`: the ids of the batches asked to cancel.
        """
        from ..cache import CaptionCache, default_cache_dir
        from ..ledger import SubmissionLedger

        cancelled = []
        with CaptionCache(cache_dir if cache_dir is not None else default_cache_dir()) as cache:
            with SubmissionLedger(cache) as ledger, self._client() as client:
                for submission in ledger.open_submissions(BATCH_KIND):
                    if submission["remote_id"] and submission["info"].get("base_url") == self.base_url:
                        client.batches.cancel(submission["remote_id"])
                        cancelled.append(submission["remote_id"])
        return cancelled

    @staticmethod
    def _find_batch(client, input_file_id: str, search: int = 1000) -> str | None:
        """The batch an interrupted run created for an uploaded file, among the account's newest `search` batches."""
        for index, batch in enumerate(client.batches.list(limit=100)):
            if batch.input_file_id == input_file_id:
                return batch.id
            if index + 1 >= search:
                break
        return None

    def _create_batch(self, client, input_file_id: str, endpoint: str) -> str:
        """Creates the batch of an uploaded file; returns its id."""
        batch = client.batches.create(
            input_file_id=input_file_id,
            endpoint=endpoint,
            completion_window=self.completion_window,
            metadata={"created_by": "mmft-hf"},
        )
        return batch.id

    def _wait_and_read(self, client, tracked: list[dict], ledger, show_progress: bool):
        """Polls the batches until each ends, then reads its output and error files and closes it in the ledger."""
        from ..batch_files import parse_output_line

        total = sum(len(submission["custom_ids"]) for submission in tracked)
        progress: dict[str, int] = {}
        failed: dict[str, int] = {}
        started, waiting = time.monotonic(), list(tracked)
        with tqdm(total=total, unit="req", desc="Batch", disable=not show_progress or not total) as bar:
            while waiting:
                statuses = []
                for submission in list(waiting):
                    batch = client.batches.retrieve(submission["remote_id"])
                    counts = batch.request_counts
                    done = (counts.completed + counts.failed) if counts is not None else 0
                    progress[submission["id"]] = done
                    failed[submission["id"]] = counts.failed if counts is not None else 0
                    statuses.append(batch.status)
                    if batch.status not in TERMINAL_STATUSES:
                        continue
                    waiting.remove(submission)
                    answered = set()
                    for file_id in (batch.output_file_id, batch.error_file_id):
                        if not file_id:
                            continue
                        for number, line in enumerate(client.files.content(file_id).text.splitlines(), start=1):
                            if not line.strip():
                                continue
                            try:
                                custom_id, result = parse_output_line(line)
                            except ValueError as error:
                                logger.warning("Batch %s, file %s, line %d: %s", batch.id, file_id, number, error)
                                continue
                            answered.add(custom_id)
                            yield custom_id, result
                    reason = f"batch {batch.id} ended {batch.status!r} without a result for this request"
                    if batch.errors is not None and batch.errors.data:
                        reason += ": " + "; ".join(str(error.message) for error in batch.errors.data[:3])
                    for custom_id in sorted(submission["custom_ids"] - answered):
                        yield custom_id, CaptionResult(text=None, error=reason)
                    progress[submission["id"]] = len(submission["custom_ids"])
                    ledger.close_submission(submission["id"], batch.status)
                bar.n = min(total, sum(progress.values()))
                bar.set_postfix(
                    status=",".join(sorted(set(statuses))),
                    failed=sum(failed.values()),
                    open=len(waiting),
                    elapsed=f"{time.monotonic() - started:.0f}s",
                    refresh=False,
                )
                bar.refresh()
                if waiting:
                    time.sleep(self.poll_interval_s)
