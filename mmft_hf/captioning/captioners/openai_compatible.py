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

from .base import CaptionRequest, CaptionResult
from .images import image_to_data_url, prepare_image, strip_thinking

logger = logging.getLogger(__name__)

NO_KEY_PLACEHOLDER = "EMPTY"  # what vLLM/Ollama docs use for servers that check no key


class CaptionerAuthenticationError(RuntimeError):
    """The API rejected the credentials (HTTP 401/403). Raised at once: a wrong key is not a per-image failure."""


class OpenAICompatibleCaptioner:
    """Captions images with a multimodal model behind an OpenAI-compatible chat-completions endpoint.

    Each request sends one user message: the image (RGB, longer side at most `max_image_side`, as a base64 data URL)
    followed by the prompt text. Up to `max_concurrency` requests are in flight at once.

    Failures are handled by kind:

    - HTTP 408/409/429/5xx, timeouts and connection errors are retried by the SDK, up to `max_retries` times, with
      exponential backoff and jitter (`min(0.5 * 2**k, 8)` s) or exactly the server's `Retry-After` when it is at
      most 120 s. When they run out, the request fails (`CaptionResult.text is None`, `error` says why).
    - HTTP 401/403 raise [`CaptionerAuthenticationError`] at once and stop the whole run.
    - Other HTTP errors (400, 404, 422, ...) and malformed responses (invalid JSON, no `choices`) fail the request.
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
        timeout (`float`, defaults to 60.0): seconds allowed per HTTP attempt.
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
    ):
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty model name, got {model!r}.")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}.")
        if max_retries < 0 or max_answer_retries < 0:
            raise ValueError(
                f"max_retries and max_answer_retries must be >= 0, got {max_retries}, {max_answer_retries}."
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
            [`CaptionerAuthenticationError`]: on HTTP 401/403, after cancelling the other requests.
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
        from openai import AsyncOpenAI

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

        async with AsyncOpenAI(
            api_key=self._api_key, base_url=self.base_url, timeout=self.timeout, max_retries=self.max_retries
        ) as client:

            async def one(index: int) -> None:
                async with semaphore:
                    emit((index, await self._caption_one(client, requests[index], data_url_of)))

            tasks = [asyncio.ensure_future(one(index)) for index in range(len(requests))]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    if not task.cancelled() and task.exception() is not None:
                        raise task.exception()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    def _encode(self, image: Image.Image) -> str:
        return image_to_data_url(prepare_image(image, self.max_image_side), self.image_format)

    async def _caption_one(self, client, request: CaptionRequest, data_url_of) -> CaptionResult:
        import openai

        try:
            url = await data_url_of(request.image)
        except (OSError, ValueError) as err:  # unreadable or truncated image file: this request only
            return CaptionResult(text=None, error=f"could not prepare the image: {type(err).__name__}: {err}")
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": request.prompt},
                ],
            }
        ]
        retries, usage = 0, Counter()
        problem = "no attempt made"
        for attempt in range(self.max_answer_retries + 1):
            if attempt:  # an answer retry is one more request
                retries += 1
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model=self.model,
                    messages=messages,
                    temperature=self.temperature,
                    max_tokens=self.max_tokens,
                    extra_body=self.extra_body or None,
                )
            except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
                who = (
                    f"the key in ${self.api_key_env}" if self.api_key_env else "the placeholder key (api_key_env=None)"
                )
                raise CaptionerAuthenticationError(
                    f"HTTP {err.status_code} from the API for model {self.model!r}: {_server_message(err)}. "
                    f"It rejected {who}; set {self.api_key_env or 'api_key_env'} to a valid key with access to "
                    "this model."
                ) from None
            except openai.APIStatusError as err:
                retries += _retries_of(err.response.request)
                return CaptionResult(
                    text=None,
                    error=f"HTTP {err.status_code}: {_server_message(err)}",
                    retries=retries,
                    usage=dict(usage),
                )
            except openai.APITimeoutError as err:  # before APIConnectionError, its base class
                retries += _retries_of(err.request)
                return CaptionResult(
                    text=None,
                    error=f"timed out after {self.timeout} s per attempt",
                    retries=retries,
                    usage=dict(usage),
                )
            except openai.APIConnectionError as err:
                retries += _retries_of(err.request)
                cause = err.__cause__ or err
                return CaptionResult(
                    text=None,
                    error=f"connection error: {type(cause).__name__}: {cause}",
                    retries=retries,
                    usage=dict(usage),
                )
            retries += raw.retries_taken
            text, problem, attempt_usage = _read_answer(raw)
            usage.update(attempt_usage)
            if text is not None:
                return CaptionResult(text=text, retries=retries, usage=dict(usage))
            if problem.startswith("malformed"):  # a broken server, not a bad draw: asking again will not help
                break
            logger.debug("Asking again (%d of %d): %s", attempt + 1, self.max_answer_retries, problem)
        return CaptionResult(text=None, error=problem, retries=retries, usage=dict(usage))


def _read_answer(raw) -> tuple[str | None, str, dict]:
    """Parses one HTTP 200 response into (caption or None, problem, usage)."""
    try:
        completion = raw.parse()
    except ValueError as err:  # json.JSONDecodeError
        return None, f"malformed response: not valid JSON ({err})", {}
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
