"""Captions from any OpenAI-compatible chat-completions API: OpenAI, Gemini, vLLM, Ollama, SGLang, LM Studio.

Transport, retries and `Retry-After` handling come from the `openai` SDK (`pip install mmft-hf[api]`); this module
adds bounded concurrency, answer validation (empty, refused and malformed answers never become captions) and a
synchronous, completion-ordered iterator that works from scripts, tests and notebooks alike.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from PIL import Image

from .base import (
    CaptionerAuthenticationError,
    CaptionerConnectionError,
    CaptionerModelNotFoundError,
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
_UNAVAILABLE_STATUSES = (502, 503, 504)  # a gateway whose backend is down: counted like connection errors


class OpenAICompatibleCaptioner:
    """Captions images with a multimodal model behind an OpenAI-compatible chat-completions endpoint.

    Each request sends one user message: the image (RGB, longer side at most `max_image_side`, as a base64 data URL)
    followed by the prompt text. Up to `max_concurrency` requests are in flight at once.

    Failures are handled by kind:

    - HTTP 408/409/429/5xx, timeouts and connection errors are retried by the SDK, up to `max_retries` times, with
      exponential backoff and jitter (`min(0.5 * 2**k, 8)` s) or exactly the server's `Retry-After` when it is at
      most 120 s. When they run out, the request fails (`CaptionResult.text is None`, `error` says why).
    - A server that cannot answer stops the run with [`CaptionerConnectionError`] instead of failing every request:
      until the server has answered once, the first request is sent alone (with at most 2 retries) and its
      connection error or timeout stops the run at once ("cannot connect to <base_url>"); later,
      `max_consecutive_connection_errors` failed requests in a row (connection errors, timeouts, HTTP 502/503/504)
      stop it (a circuit breaker). Any answer from the server starts the count again.
    - HTTP 401/403 raise [`CaptionerAuthenticationError`] and HTTP 404 [`CaptionerModelNotFoundError`] at once and
      stop the whole run: neither depends on the image.
    - Other HTTP errors (400, 422, ...) and malformed responses (invalid JSON, no `choices`) fail the request.
    - An empty answer (after removing `<think>` blocks), `finish_reason="content_filter"` or a `refusal` is asked
      again up to `max_answer_retries` times, then fails the request. It is never returned as a caption.

    Args:
        model (`str`): the model name the server expects, e.g. `"gemini-2.5-flash-lite"` or `"gpt-4o-mini"`.
        base_url (`str`, *optional*): the API root, e.g. `"http://localhost:8000/v1"` (vLLM) or
            `"https://generativelanguage.googleapis.com/v1beta/openai/"` (Gemini). `None` uses the SDK's default
            (`OPENAI_BASE_URL` or OpenAI).
        api_key_env (`str`, *optional*, defaults to `"OPENAI_API_KEY"`): the environment variable holding the API
            key, read once, here. `None` sends the placeholder key `"EMPTY"`, for local servers without keys.
        max_concurrency (`int`, defaults to 16): requests in flight at once.
        temperature (`float`, defaults to 0.2): sampling temperature (the MMFT reference uses 0.2).
        max_tokens (`int`, defaults to 256): the answer's token limit.
        timeout (`float`, defaults to 60.0): seconds allowed per HTTP attempt (opening the connection: at most
            10 s of it).
        max_retries (`int`, defaults to 5): SDK retries per request for transient errors (so up to 6 attempts).
        max_image_side (`int`, *optional*, defaults to 768): images are downscaled (never upscaled) so their longer
            side is at most this; `None` sends them at full size.
        image_format (`str`, defaults to `"JPEG"`): `"JPEG"` (quality 90, smaller uploads) or `"PNG"` (lossless).
        extra_body (`dict`, *optional*): extra JSON fields merged into every request body, e.g.
            `{"reasoning_effort": "none"}` or vLLM's `{"chat_template_kwargs": {"enable_thinking": False}}`.
            Part of the cache identity, since it can change the answers.
        max_answer_retries (`int`, defaults to 2): how many times an empty or refused answer is asked again.
        cache_tag (`str`, *optional*): an extra label for the cache identity, to keep apart captions of
            different deployments that share a model name (e.g. two quantisations served as `"llava"`).
        max_consecutive_connection_errors (`int`, defaults to 3): the circuit breaker: this many requests in a row
            that fail to reach the server (after their retries) stop the run with [`CaptionerConnectionError`].
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
                other requests: [`CaptionerConnectionError`], [`CaptionerAuthenticationError`] (HTTP 401/403) or
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
        async with AsyncOpenAI(
            api_key=self._api_key, base_url=self.base_url, timeout=timeout, max_retries=self.max_retries
        ) as client:

            async def one(index: int, sender=client) -> None:
                async with semaphore:
                    emit((index, await self._caption_one(sender, requests[index], data_url_of)))

            first = 0
            if not self._server_answered:  # a server that cannot answer is told by one request, not by a burst
                await one(0, client.with_options(max_retries=min(self.max_retries, FIRST_REQUEST_MAX_RETRIES)))
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

    def request_body(self, prompt: str, image_url: str, response_format: dict | None = None) -> dict:
        """The chat-completions request body for one image and prompt: what this captioner sends, and (as the
        `body` of each JSONL line) what the Batch API captioner and `export_caption_requests` write.

        Args:
            prompt (`str`): the full prompt text.
            image_url (`str`): the image as a `data:` URL (see `image_to_data_url`) or an `https://` URL.
            response_format (`dict`, *optional*): an OpenAI `response_format`, e.g. a JSON schema.

        Returns:
            `dict`: `model`, `messages` (one user message: the image, then the prompt), `temperature`,
            `max_tokens`, `response_format` when given, and every field of `extra_body`.
        """
        content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": prompt}]
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        if response_format is not None:
            body["response_format"] = response_format
        return {**body, **self.extra_body}

    def _encode(self, image: Image.Image) -> str:
        return image_to_data_url(prepare_image(image, self.max_image_side), self.image_format)

    async def _caption_one(self, client, request: CaptionRequest, data_url_of) -> CaptionResult:
        import openai

        try:
            url = await data_url_of(request.image)
        except (OSError, ValueError) as err:  # unreadable or truncated image file: this request only
            return CaptionResult(text=None, error=f"could not prepare the image: {type(err).__name__}: {err}")
        body = self.request_body(request.prompt, url, getattr(request, "response_format", None))
        # model and messages are the SDK's required arguments; every other field travels as extra_body, so the JSON
        # sent is exactly `body`, the same body the Batch API captioner writes into its request files.
        fields = {name: value for name, value in body.items() if name not in ("model", "messages")}
        retries, usage = 0, Counter()
        problem = "no attempt made"
        for attempt in range(self.max_answer_retries + 1):
            if attempt:  # an answer retry is one more request
                retries += 1
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
                    f"Model {self.model!r} not found (HTTP 404) at {self._api_root(client)}: {_server_message(err)}. "
                    f"Check the model name (GET {self._api_root(client).rstrip('/')}/models lists the served ones) "
                    "and that the base URL is the API root (it usually ends in /v1)."
                ) from None
            except openai.APIStatusError as err:
                retries += _retries_of(err.response.request)
                error = f"HTTP {err.status_code}: {_server_message(err)}"
                if err.status_code in _UNAVAILABLE_STATUSES:  # an answer, but from a gateway without a backend
                    self._unreachable(client, error, retries, count_only=True)
                else:
                    self._answered()
                return CaptionResult(text=None, error=error, retries=retries, usage=dict(usage))
            except openai.APITimeoutError as err:  # before APIConnectionError, its base class
                retries += _retries_of(err.request)
                error = f"timed out after {self.timeout} s per attempt"
                self._unreachable(client, error, retries)
                return CaptionResult(text=None, error=error, retries=retries, usage=dict(usage))
            except openai.APIConnectionError as err:
                retries += _retries_of(err.request)
                cause = err.__cause__ or err
                error = f"connection error: {type(cause).__name__}: {cause}"
                self._unreachable(client, error, retries)
                return CaptionResult(text=None, error=error, retries=retries, usage=dict(usage))
            self._answered()
            retries += raw.retries_taken
            text, problem, attempt_usage = _read_answer(raw)
            usage.update(attempt_usage)
            if text is not None:
                return CaptionResult(text=text, retries=retries, usage=dict(usage))
            if problem.startswith("malformed"):  # a broken server, not a bad draw: asking again will not help
                break
            logger.debug("Asking again (%d of %d): %s", attempt + 1, self.max_answer_retries, problem)
        return CaptionResult(text=None, error=problem, retries=retries, usage=dict(usage))

    def _api_root(self, client) -> str:
        return self.base_url or str(client.base_url)

    def _answered(self) -> None:
        """The server answered (with a caption or an HTTP error): it is there, and the breaker's count restarts."""
        self._server_answered, self._failures_in_a_row = True, 0

    def _unreachable(self, client, error: str, retries: int, count_only: bool = False) -> None:
        """Counts a request that got no answer from the model's server; raises when the run should stop.

        Args:
            client (`AsyncOpenAI`): the client (for the URL in messages).
            error (`str`): what happened to the request.
            retries (`int`): the SDK's retries of the request.
            count_only (`bool`, defaults to `False`): only count it for the circuit breaker (HTTP 502/503/504: a
                gateway answered), never treat it as the first request to a server that cannot be reached.

        Raises:
            [`CaptionerConnectionError`]: on the first request to a server that never answered, or after
                `max_consecutive_connection_errors` such requests in a row.
        """
        self._failures_in_a_row += 1
        after = f"after {retries} {'retry' if retries == 1 else 'retries'}"
        if not self._server_answered and not count_only:
            raise CaptionerConnectionError(
                f"Cannot connect to {self._api_root(client)} ({error}, {after}). Is the server running, and are "
                "the scheme, host, port and path of the URL right?"
            )
        if self._failures_in_a_row >= self.max_consecutive_connection_errors:
            raise CaptionerConnectionError(
                f"Stopped: {self._failures_in_a_row} consecutive requests to {self._api_root(client)} got no answer "
                f"(last: {error}, {after}). The server stopped answering; check it and run again."
            )


def _read_answer(raw) -> tuple[str | None, str, dict]:
    """Parses one HTTP 200 response into (caption or None, problem, usage)."""
    try:
        completion = raw.parse()
    except ValueError as err:  # json.JSONDecodeError
        return None, f"malformed response: not valid JSON ({err})", {}
    return read_completion(completion)


def read_completion(completion) -> tuple[str | None, str, dict]:
    """Reads a parsed chat completion (the SDK's object, or a Batch API output line's `response.body` dict).

    Args:
        completion (`ChatCompletion` or `dict`): the completion.

    Returns:
        `tuple[str | None, str, dict]`: the caption (`None` for an empty, refused or malformed answer), the problem
        when there is no caption, and the integer token counts of `usage`.
    """
    if isinstance(completion, dict):
        from openai.types.chat import ChatCompletion

        try:
            completion = ChatCompletion.model_validate(completion)
        except ValueError as err:  # pydantic.ValidationError
            return None, f"malformed response: not a chat completion ({str(err).splitlines()[0]})", {}
    usage = getattr(completion, "usage", None)
    usage = {
        key: value
        for key, value in (usage.model_dump() if hasattr(usage, "model_dump") else {}).items()
        if isinstance(value, int)
    }
    choices = getattr(completion, "choices", None)
    if isinstance(completion, str) or not isinstance(choices, list) or not choices:
        return None, "malformed response: no 'choices' in the answer", usage
    choice = choices[0]
    message = getattr(choice, "message", None)
    finish_reason = getattr(choice, "finish_reason", None)
    if message is None:
        return None, "malformed response: the first choice has no 'message'", usage
    refusal = getattr(message, "refusal", None)
    if refusal:
        return None, f"refused: {refusal}", usage
    if finish_reason == "content_filter":
        return None, "refused: finish_reason 'content_filter'", usage
    content = getattr(message, "content", None)
    text = strip_thinking(content) if isinstance(content, str) else ""
    if not text:
        return None, f"empty answer (finish_reason {finish_reason!r})", usage
    return text, "", usage


def _retries_of(request) -> int:
    # The SDK numbers its attempts in a request header; the last request sent tells how many retries were made.
    try:
        return int(request.headers.get("x-stainless-retry-count", 0))
    except (AttributeError, ValueError):
        return 0


def _server_message(err) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        body = body.get("message", body)
    return str(body) if body else type(err).__name__


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()
