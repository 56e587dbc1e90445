"""Captions from any OpenAI-compatible chat-completions API: OpenAI, Gemini, vLLM, Ollama, SGLang, LM Studio.

The `openai` SDK (`pip install mmft-hf[api]`) does the HTTP; this module adds bounded concurrency, its own retries
(so that timeouts, server errors and connection errors each reach the circuit breaker as they happen), the quality
gate (`captioning/quality.py`: empty, refused, cut and runaway answers never become captions) and a synchronous,
completion-ordered iterator that works from scripts, tests and notebooks alike.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from PIL import Image

from ..quality import is_cut, max_words_asked, raised_token_limit, rejection_reason
from .base import (
    CaptionerAuthenticationError,
    CaptionerConnectionError,
    CaptionerModelNotFoundError,
    CaptionerNotAnsweringError,
    CaptionerServerError,
    CaptionRequest,
    CaptionResult,
)
from .images import image_to_data_url, prepare_image, strip_thinking

logger = logging.getLogger(__name__)

NO_KEY_PLACEHOLDER = "EMPTY"  # what vLLM/Ollama docs use for servers that check no key
MAX_CONNECT_TIMEOUT = 10.0  # seconds to open a connection: a host that takes longer is down, whatever `timeout` is
# Retries of the first request to a server that has not answered yet: a wrong URL or a server that is not up does
# not heal in the 15 s of the full backoff, and an unreachable server must stop a run within seconds.
FIRST_REQUEST_MAX_RETRIES = 2
MAX_RETRY_AFTER = 120.0  # seconds: a longer `Retry-After` fails the request at once (as the SDK does)
_RETRIED_STATUSES = (408, 409, 429)  # and every 5xx: transient server-side failures, as the SDK retries them


class OpenAICompatibleCaptioner:
    """Captions images with a multimodal model behind an OpenAI-compatible chat-completions endpoint.

    Each request sends one user message: the image (RGB, longer side at most `max_image_side`, as a base64 data URL)
    followed by the prompt text. Up to `max_concurrency` requests are in flight at once.

    Failures are handled by kind:

    - HTTP 408/409/429/5xx and connection errors are retried up to `max_retries` times, with exponential backoff and
      jitter (`min(0.5 * 2**k, 8)` s) or exactly the server's `Retry-After` when it is at most 120 s; a longer
      `Retry-After` fails the request at once. A timed-out attempt is retried too, but counts for the circuit
      breaker at once (below). When the retries run out, the request fails (`CaptionResult.text is None`, `error`
      says why).
    - A server that cannot answer stops the run with a [`CaptionerUnavailableError`] instead of failing every
      request. Until the server has answered once, the first request is sent alone with at most 2 retries: a
      connection error stops the run ([`CaptionerConnectionError`], "cannot connect to <base_url>"), and so do
      timeouts ([`CaptionerNotAnsweringError`], "is not answering": it accepts connections but does not answer).
      Later, a circuit breaker stops the run after `max_consecutive_connection_errors` failures in a row: timed-out
      attempts ([`CaptionerNotAnsweringError`], "stopped answering", so a hung server is noticed within about that
      many request timeouts), requests that could not connect after their retries ([`CaptionerConnectionError`])
      or requests that got only HTTP 5xx/408/409/429 after their retries ([`CaptionerServerError`]: a storm of
      server errors, or rate limits beyond the `Retry-After` budget). Any other answer starts the count again.
    - HTTP 401/403 raise [`CaptionerAuthenticationError`] and HTTP 404 [`CaptionerModelNotFoundError`] at once and
      stop the whole run: neither depends on the image.
    - Other HTTP errors (400, 422, ...) and malformed responses (invalid JSON, no `choices`) fail the request.
    - An answer the quality gate rejects (empty after removing `<think>` blocks, a `refusal` or a plain-text
      refusal, `finish_reason` other than `"stop"`, far longer than the prompt's "in N words") is asked again up to
      `max_answer_retries` times, then fails the request with `error="rejected: <reason>"`. It is never returned as
      a caption. An answer cut by the token limit (`finish_reason="length"`) is asked again with the limit doubled,
      up to 4 × `max_tokens` (`quality.raised_token_limit`); a request's own `max_tokens` (set by the engine for
      an answer cut in an earlier pass) replaces `max_tokens` as the starting limit.
    - A result says what the provider processed: `processed=False` when no attempt got an HTTP response
      (connection errors, timeouts; `unanswered` counts those attempts), so summaries count only what was answered.

    Args:
        model (`str`): the model name the server expects, e.g. `"gemini-2.5-flash-lite"` or `"gpt-4o-mini"`.
        base_url (`str`, *optional*): the API root, e.g. `"http://localhost:8000/v1"` (vLLM) or
            `"https://generativelanguage.googleapis.com/v1beta/openai/"` (Gemini). `None` uses the SDK's default
            (`OPENAI_BASE_URL` or OpenAI).
        api_key_env (`str`, *optional*, defaults to `"OPENAI_API_KEY"`): the environment variable holding the API
            key, read once, here. `None` sends the placeholder key `"EMPTY"`, for local servers without keys.
        max_concurrency (`int`, defaults to 16): requests in flight at once.
        temperature (`float`, defaults to 0.2): sampling temperature (the MMFT reference uses 0.2).
        max_tokens (`int`, defaults to 256): the answer's token limit (raised, per request, for an answer it cut).
        timeout (`float`, defaults to 60.0): seconds allowed per HTTP attempt (opening the connection: at most
            10 s of it).
        max_retries (`int`, defaults to 5): retries per request for transient errors (so up to 6 attempts).
        max_image_side (`int`, *optional*, defaults to 768): images are downscaled (never upscaled) so their longer
            side is at most this; `None` sends them at full size.
        image_format (`str`, defaults to `"JPEG"`): `"JPEG"` (quality 90, smaller uploads) or `"PNG"` (lossless).
        extra_body (`dict`, *optional*): extra JSON fields merged into every request body, e.g.
            `{"reasoning_effort": "none"}` or vLLM's `{"chat_template_kwargs": {"enable_thinking": False}}`.
            Part of the cache identity, since it can change the answers.
        max_answer_retries (`int`, defaults to 2): how many times an answer the quality gate rejects is asked again.
        cache_tag (`str`, *optional*): an extra label for the cache identity, to keep apart captions of
            different deployments that share a model name (e.g. two quantisations served as `"llava"`).
        max_consecutive_connection_errors (`int`, defaults to 3): the circuit breaker: this many failures in a row
            (timed-out attempts; requests that failed to connect or got only server errors after their retries)
            stop the run.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        max_concurrency: int = 16,
        temperature: float = 0.2,
        max_tokens: int = 256,
        timeout: float = 60.0,
        max_retries: int = 5,
        max_image_side: int | None = 768,
        image_format: str = "JPEG",
        extra_body: dict | None = None,
        max_answer_retries: int = 2,
        cache_tag: str | None = None,
        max_consecutive_connection_errors: int = 3,
    ):
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty model name, got {model!r}.")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}.")
        if max_retries < 0 or max_answer_retries < 0:
            raise ValueError(
                f"max_retries and max_answer_retries must be >= 0, got {max_retries}, {max_answer_retries}."
            )
        if not isinstance(max_consecutive_connection_errors, int) or max_consecutive_connection_errors < 1:
            raise ValueError(
                f"max_consecutive_connection_errors must be a positive integer, got {max_consecutive_connection_errors!r}."
            )
        if max_image_side is not None and max_image_side < 1:
            raise ValueError(f"max_image_side must be a positive number of pixels or None, got {max_image_side}.")
        image_format = image_format.upper()
        if image_format not in ("JPEG", "PNG"):
            raise ValueError(f"image_format must be 'JPEG' or 'PNG', got {image_format!r}.")
        extra_body = dict(extra_body or {})
        try:
            json.dumps(extra_body, sort_keys=True)
        except TypeError as err:
            raise ValueError(f"extra_body must be JSON-serialisable (it is sent to the API): {err}") from None
        try:
            import openai  # noqa: F401
        except ImportError:
            raise ImportError(
                "OpenAICompatibleCaptioner needs the `openai` package: pip install 'mmft-hf[api]'"
            ) from None

        if api_key_env is None:
            api_key = NO_KEY_PLACEHOLDER
        else:
            api_key = os.environ.get(api_key_env, "")
            if not api_key.strip():
                raise ValueError(
                    f"No API key: the environment variable {api_key_env} is not set. Set it (export "
                    f"{api_key_env}=...), name another variable with api_key_env=, or pass api_key_env=None for "
                    "a local server that needs no key."
                )
        self._api_key = api_key  # private; kept out of repr, cache_identity, logs and errors

        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_image_side = max_image_side
        self.image_format = image_format
        self.extra_body = extra_body
        self.max_answer_retries = max_answer_retries
        self.cache_tag = cache_tag
        self.max_consecutive_connection_errors = max_consecutive_connection_errors
        self._server_answered = False  # until then, the first request goes alone and a connection error stops
        self._failures_in_a_row = 0  # requests in a row that did not reach the server (the circuit breaker)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model={self.model!r}, base_url={self.base_url!r}, "
            f"api_key_env={self.api_key_env!r}, max_concurrency={self.max_concurrency}, "
            f"temperature={self.temperature}, max_tokens={self.max_tokens})"
        )

    def cache_identity(self) -> dict:
        """What makes two captioners' answers interchangeable; part of the caption cache key.

        `base_url` is deliberately left out: the same model behind another URL (a proxy, a new port, a gateway)
        gives the same captions, and moving a server must not discard paid-for captions. Use `cache_tag` to keep
        apart deployments that share a model name but not the weights. Transport settings (timeouts, retries,
        concurrency) are left out too. The API key never appears.
        """
        identity = {
            "backend": "openai-compatible",
            "model": self.model,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "max_image_side": self.max_image_side,
            "image_format": self.image_format,
            "extra_body": self.extra_body,
        }
        if self.cache_tag is not None:
            identity["cache_tag"] = self.cache_tag
        return identity

    # ------------------------------------------------------------------ sync front
    def caption(self, requests: Sequence[CaptionRequest]) -> Iterator[tuple[int, CaptionResult]]:
        """Captions `requests` concurrently, yielding `(index, result)` in completion order.

        The requests run on an event loop in a background thread, so this works the same from a script, from
        pytest and from a notebook whose own loop is already running. Closing the iterator early (`break`,
        an exception, Ctrl-C) cancels the requests still in flight.

        Args:
            requests (`Sequence[CaptionRequest]`): the images and full prompts.

        Yields:
            `tuple[int, CaptionResult]`: the index into `requests` and its result.

        Raises:
            [`CaptionerUnavailableError`]: the server cannot answer (see the class docstring), after cancelling the
                other requests: [`CaptionerConnectionError`], [`CaptionerNotAnsweringError`],
                [`CaptionerServerError`], [`CaptionerAuthenticationError`] (HTTP 401/403) or
                [`CaptionerModelNotFoundError`] (HTTP 404).
        """
        requests = list(requests)
        if not requests:
            return
        for index, request in enumerate(requests):
            if not isinstance(request, CaptionRequest):
                raise TypeError(f"requests[{index}] is a {type(request).__name__}, expected a CaptionRequest.")
        results: queue.SimpleQueue = queue.SimpleQueue()
        handle: dict[str, Any] = {}

        async def main() -> None:
            handle["loop"], handle["task"] = asyncio.get_running_loop(), asyncio.current_task()
            await self._caption_all(requests, results.put)

        def run() -> None:
            try:
                asyncio.run(main())
            except asyncio.CancelledError:
                pass  # the consumer went away
            except BaseException as err:  # handed to the consumer thread, which re-raises it
                results.put(_Failure(err))
            finally:
                results.put(_DONE)

        thread = threading.Thread(target=run, name="openai-captioner", daemon=True)
        thread.start()
        try:
            while True:
                item = results.get()
                if item is _DONE:
                    break
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            if thread.is_alive() and "task" in handle:
                try:
                    handle["loop"].call_soon_threadsafe(handle["task"].cancel)
                except RuntimeError:  # the loop closed in between: nothing left to cancel
                    pass
            thread.join()

    # ------------------------------------------------------------------ async core
    async def _caption_all(self, requests: list[CaptionRequest], emit) -> None:
        from openai import AsyncOpenAI, Timeout

        semaphore = asyncio.Semaphore(self.max_concurrency)
        # Three prompts per image are the norm: encode each image object once, on a worker thread (PIL work
        # would stall the event loop), and drop the encoding when its last request is done.
        uses = Counter(id(request.image) for request in requests)
        encodings: dict[int, asyncio.Future] = {}

        async def data_url_of(image: Image.Image) -> str:
            key = id(image)
            if key not in encodings:
                encodings[key] = asyncio.ensure_future(asyncio.to_thread(self._encode, image))
            try:
                return await asyncio.shield(encodings[key])
            finally:
                uses[key] -= 1
                if uses[key] == 0:
                    del encodings[key]

        timeout = Timeout(self.timeout, connect=min(self.timeout, MAX_CONNECT_TIMEOUT))
        # Retries are this class's own (see `_send`): the SDK would retry a timeout `max_retries` times before the
        # circuit breaker hears of it, so a hung server would take (max_retries + 1) timeouts per request to notice.
        async with AsyncOpenAI(
            api_key=self._api_key, base_url=self.base_url, timeout=timeout, max_retries=0
        ) as client:

            async def one(index: int, max_retries: int = self.max_retries) -> None:
                async with semaphore:
                    emit((index, await self._caption_one(client, requests[index], data_url_of, max_retries)))

            first = 0
            if not self._server_answered:  # a server that cannot answer is told by one request, not by a burst
                await one(0, min(self.max_retries, FIRST_REQUEST_MAX_RETRIES))
                first = 1
            tasks = [asyncio.ensure_future(one(index)) for index in range(first, len(requests))]
            if not tasks:
                return
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    if not task.cancelled() and task.exception() is not None:
                        raise task.exception()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    def request_body(
        self, prompt: str, image_url: str, response_format: dict | None = None, max_tokens: int | None = None
    ) -> dict:
        """The chat-completions request body for one image and prompt: what this captioner sends, and (as the
        `body` of each JSONL line) what the Batch API captioner and `export_caption_requests` write.

        Args:
            prompt (`str`): the full prompt text.
            image_url (`str`): the image as a `data:` URL (see `image_to_data_url`) or an `https://` URL.
            response_format (`dict`, *optional*): an OpenAI `response_format`, e.g. a JSON schema.
            max_tokens (`int`, *optional*): this request's token limit; `None` sends the captioner's `max_tokens`.

        Returns:
            `dict`: `model`, `messages` (one user message: the image, then the prompt), `temperature`,
            `max_tokens`, `response_format` when given, and every field of `extra_body`.
        """
        content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": prompt}]
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": self.temperature,
            "max_tokens": max_tokens or self.max_tokens,
        }
        if response_format is not None:
            body["response_format"] = response_format
        return {**body, **self.extra_body}

    def _encode(self, image: Image.Image) -> str:
        return image_to_data_url(prepare_image(image, self.max_image_side), self.image_format)

    async def _caption_one(self, client, request: CaptionRequest, data_url_of, max_retries: int) -> CaptionResult:
        try:
            url = await data_url_of(request.image)
        except (OSError, ValueError) as err:  # unreadable or truncated image file: this request only, never sent
            error = f"could not prepare the image: {type(err).__name__}: {err}"
            return CaptionResult(text=None, error=error, processed=False)
        limit = request.max_tokens or self.max_tokens
        body = self.request_body(request.prompt, url, request.response_format, limit)
        max_words = max_words_asked(request.prompt)
        retries, unanswered, usage, rejected = 0, 0, Counter(), []
        result = CaptionResult(text=None, error="no attempt made")
        for attempt in range(self.max_answer_retries + 1):
            if attempt:  # an answer retry is one more request
                retries += 1
                rejected.append(result.error.removeprefix("rejected: "))  # the answer asked again
                if is_cut(rejected[-1]):  # at the same limit it would be cut (and paid) again
                    limit = body["max_tokens"] = raised_token_limit(limit, self.max_tokens)
            raw, failure, transport_retries, no_answer = await self._send(client, body, max_retries)
            retries, unanswered = retries + transport_retries, unanswered + no_answer
            if failure is not None:
                return CaptionResult(
                    text=None, error=failure, retries=retries, usage=dict(usage), rejected=rejected,
                    processed=retries + 1 > unanswered, unanswered=unanswered, max_tokens=limit,
                )  # fmt: skip
            result = _read_answer(raw, max_words)
            usage.update(result.usage)
            if result.text is not None or result.error.startswith("malformed"):  # a broken server will not heal
                break
            logger.debug("Asking again (%d of %d): %s", attempt + 1, self.max_answer_retries, result.error)
        result.retries, result.usage, result.rejected = retries, dict(usage), rejected
        result.unanswered, result.max_tokens = unanswered, limit
        return result

    async def _send(self, client, body: dict, max_retries: int) -> tuple[Any, str | None, int, int]:
        """Sends one request, retrying transient failures; returns `(raw response, None, retries, unanswered)` or
        `(None, why it failed, retries, unanswered)`, where `unanswered` counts the attempts that got no HTTP
        response (connection errors, timeouts), and raises when the run should stop (see the class docstring)."""
        import openai

        # model and messages are the SDK's required arguments; every other field travels as extra_body, so the JSON
        # sent is exactly `body`, the same body the Batch API captioner writes into its request files.
        fields = {name: value for name, value in body.items() if name not in ("model", "messages")}
        unanswered = 0
        for attempt in range(max_retries + 1):
            last = attempt == max_retries
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model=body["model"], messages=body["messages"], extra_body=fields
                )
            except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
                if self.api_key_env:
                    fix = f"the key in ${self.api_key_env}; set {self.api_key_env} to a valid key with access to it"
                else:
                    fix = (
                        "the placeholder key sent when no key variable is given; give the environment variable "
                        "holding a valid key (api_key_env in Python, --api_key_env in the CLI)"
                    )
                raise CaptionerAuthenticationError(
                    f"HTTP {err.status_code} from the API for model {self.model!r}: {_server_message(err)}. "
                    f"It rejected {fix}."
                ) from None
            except openai.NotFoundError as err:
                raise CaptionerModelNotFoundError(
                    f"Model {self.model!r} not found (HTTP {err.status_code}) at {self._api_root(client)}: "
                    f"{_server_message(err)}. Check the model name (GET {self._api_root(client).rstrip('/')}/models "
                    "lists the served ones) and that the base URL is the API root (it usually ends in /v1)."
                ) from None
            except openai.APIStatusError as err:
                error = f"HTTP {err.status_code}: {_server_message(err)}"
                if err.status_code not in _RETRIED_STATUSES and err.status_code < 500:  # 400, 422: this request
                    self._answered()
                    return None, error, attempt, unanswered
                wait = _retry_after(err.response.headers)
                if wait is not None and wait > MAX_RETRY_AFTER:  # rate limited for longer than a request waits
                    error += f" (Retry-After {wait:.0f} s, beyond the {MAX_RETRY_AFTER:.0f} s a request waits)"
                    last = True
                if last:
                    self._server_failure(client, error, attempt)
                    return None, error, attempt, unanswered
                await asyncio.sleep(wait if wait is not None and wait > 0 else _backoff(attempt))
                continue
            except openai.APITimeoutError:  # before APIConnectionError, its base class
                error = f"timed out: no answer within {self.timeout:g} s"
                unanswered += 1
                # every attempt counts: a hung server is stopped after a few timeouts, not after every retry of them
                self._no_answer(client, error, attempt, last_attempt=last)
                if last:
                    return None, error, attempt, unanswered
                await asyncio.sleep(_backoff(attempt))
                continue
            except openai.APIConnectionError as err:
                cause = err.__cause__ or err
                error = f"connection error: {type(cause).__name__}: {cause}"
                unanswered += 1
                if last:
                    self._connection_failure(client, error, attempt)
                    return None, error, attempt, unanswered
                await asyncio.sleep(_backoff(attempt))
                continue
            self._answered()
            return raw, None, attempt, unanswered
        raise AssertionError("unreachable")  # the last attempt returns or raises

    def _api_root(self, client) -> str:
        return self.base_url or str(client.base_url)

    def _answered(self) -> None:
        """The server answered (with a caption or a client error): it is there, and the breaker's count restarts."""
        self._server_answered, self._failures_in_a_row = True, 0

    def _how_to_raise_timeout(self) -> str:
        return (
            f"if it is only slow (long answers, a loaded server), raise the {self.timeout:g} s request timeout "
            "(--timeout in the CLI, timeout= in Python)"
        )

    def _no_answer(self, client, error: str, retries: int, last_attempt: bool) -> None:
        """Counts an attempt that timed out; raises [`CaptionerNotAnsweringError`] when the run should stop."""
        self._failures_in_a_row += 1
        tripped = self._failures_in_a_row >= self.max_consecutive_connection_errors
        if not self._server_answered and (last_attempt or tripped):
            raise CaptionerNotAnsweringError(
                f"{self._api_root(client)} is not answering: it accepts connections, but {retries + 1} "
                f"{'attempt' if retries == 0 else 'attempts'} of the first request timed out (no answer within "
                f"{self.timeout:g} s). Check the server (is the model still loading?); "
                f"{self._how_to_raise_timeout()}."
            )
        if tripped:
            raise CaptionerNotAnsweringError(
                f"{self._api_root(client)} stopped answering: {self._failures_in_a_row} consecutive requests timed "
                f"out (no answer within {self.timeout:g} s). Check the server; {self._how_to_raise_timeout()}."
            )

    def _connection_failure(self, client, error: str, retries: int) -> None:
        """Counts a request that could not connect after its retries; raises when the run should stop."""
        self._failures_in_a_row += 1
        after = f"after {retries} {'retry' if retries == 1 else 'retries'}"
        if not self._server_answered:
            raise CaptionerConnectionError(
                f"Cannot connect to {self._api_root(client)} ({error}, {after}). Is the server running, and are "
                "the scheme, host, port and path of the URL right?"
            )
        if self._failures_in_a_row >= self.max_consecutive_connection_errors:
            raise CaptionerConnectionError(
                f"Stopped: {self._failures_in_a_row} consecutive requests could not connect to "
                f"{self._api_root(client)} (last: {error}, {after}). The server went away; check it and run again."
            )

    def _server_failure(self, client, error: str, retries: int) -> None:
        """Counts a request that got only server errors (HTTP 5xx, 408, 409, 429) after its retries; raises
        [`CaptionerServerError`] when the run should stop."""
        self._server_answered = True  # it answers, so a later timeout is a server that stopped answering
        self._failures_in_a_row += 1
        if self._failures_in_a_row >= self.max_consecutive_connection_errors:
            raise CaptionerServerError(
                f"Stopped: {self._failures_in_a_row} consecutive requests to {self._api_root(client)} failed with "
                f"server errors after {retries} {'retry' if retries == 1 else 'retries'} each (last: {error}). "
                "The server keeps failing; check it (or its rate limits) and run again."
            )


def _read_answer(raw, max_words: int | None) -> CaptionResult:
    """Parses one HTTP 200 response into a result that passed the quality gate (or says why not)."""
    try:
        result = parse_completion(raw.parse())
    except ValueError as err:  # json.JSONDecodeError
        return CaptionResult(text=None, error=f"malformed response: not valid JSON ({err})")
    if result.text is not None:
        reason = rejection_reason(
            result.text, finish_reason=result.finish_reason, refusal=result.refusal, max_words=max_words
        )
        if reason:
            result.text, result.error = None, f"rejected: {reason}"
    return result


def parse_completion(completion) -> CaptionResult:
    """Reads a chat completion as it came, without judging it (the quality gate, `captioning/quality.py`, does).

    Args:
        completion (`ChatCompletion` or `dict`): the SDK's object, or a Batch API output line's `response.body`.

    Returns:
        [`CaptionResult`]: `text` is the answer with `<think>` blocks removed (possibly empty), with `usage` (the
        integer token counts), `finish_reason` and `refusal`; for a malformed completion (no `choices`, no
        `message`) `text` is `None` and `error` starts with `"malformed response"`.
    """
    if isinstance(completion, dict):
        from openai.types.chat import ChatCompletion

        try:
            completion = ChatCompletion.model_validate(completion)
        except ValueError as err:  # pydantic.ValidationError
            return CaptionResult(
                text=None, error=f"malformed response: not a chat completion ({str(err).splitlines()[0]})"
            )
    usage = getattr(completion, "usage", None)
    usage = {
        key: value
        for key, value in (usage.model_dump() if hasattr(usage, "model_dump") else {}).items()
        if isinstance(value, int)
    }
    choices = getattr(completion, "choices", None)
    if isinstance(completion, str) or not isinstance(choices, list) or not choices:
        return CaptionResult(text=None, error="malformed response: no 'choices' in the answer", usage=usage)
    message = getattr(choices[0], "message", None)
    finish_reason = getattr(choices[0], "finish_reason", None)
    if message is None:
        error = "malformed response: the first choice has no 'message'"
        return CaptionResult(text=None, error=error, usage=usage, finish_reason=finish_reason)
    content = getattr(message, "content", None)
    return CaptionResult(
        text=strip_thinking(content) if isinstance(content, str) else "",
        usage=usage,
        finish_reason=finish_reason,
        refusal=getattr(message, "refusal", None) or None,
    )


def _retry_after(headers) -> float | None:
    """The server's requested wait in seconds (`retry-after-ms`, or `Retry-After` as seconds or an HTTP date)."""
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return float(value) / divisor
        except ValueError:
            pass
    try:
        return email.utils.parsedate_to_datetime(headers.get("retry-after")).timestamp() - time.time()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _backoff(attempt: int) -> float:
    """The SDK's backoff: `min(0.5 * 2**attempt, 8)` s less up to 25 % jitter."""
    return min(0.5 * 2.0**attempt, 8.0) * (1 - 0.25 * random.random())


def _server_message(err) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        body = body.get("message", body)
    return str(body) if body else type(err).__name__


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()
