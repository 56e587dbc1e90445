"""The OpenAI Batch API JSONL format, spoken by OpenAI's and Gemini's Batch APIs and by `vllm run-batch`.

A request line is `{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}`, where `body` is exactly
what `OpenAICompatibleCaptioner` sends synchronously (`request_body`) and `custom_id` is the caption cache key (or,
for a one-request-per-image request, the key of the joint request). An output line is `{"id", "custom_id",
"response": {"status_code", "request_id", "body"}, "error"}`; lines of failed requests (in the error file) carry an
HTTP status other than 200 or an `error` object such as `{"code": "batch_expired"}`.
"""

from __future__ import annotations

import json

from .captioners.base import CaptionResult
from .captioners.images import image_to_data_url, prepare_image

CHAT_COMPLETIONS_URL = "/v1/chat/completions"


def request_line(captioner, custom_id: str, image, prompt: str, response_format: dict | None = None) -> str:
    """One Batch API request line (without the newline) for an image and prompt.

    Args:
        captioner (`OpenAICompatibleCaptioner`): gives the request body (`request_body`) and image settings.
        custom_id (`str`): the id the engine copies into the output line.
        image (`PIL.Image.Image`): the image, prepared like the synchronous captioner does (RGB, bounded side).
        prompt (`str`): the full prompt.
        response_format (`dict`, *optional*): a `response_format` for the body.

    Returns:
        `str`: the JSON line.
    """
    url = image_to_data_url(prepare_image(image, captioner.max_image_side), captioner.image_format)
    body = captioner.request_body(prompt, url, response_format)
    return json.dumps(
        {"custom_id": custom_id, "method": "POST", "url": CHAT_COMPLETIONS_URL, "body": body}, ensure_ascii=False
    )


def not_sent(error: str) -> CaptionResult:
    """The result of a request that never left this machine (e.g. its image cannot be read): not counted as one."""
    result = CaptionResult(text=None, error=error)
    result.sent = False
    return result


def parse_output_line(line: str) -> tuple[str, CaptionResult]:
    """Reads one line of a Batch API output or error file.

    Args:
        line (`str`): the JSON line.

    Returns:
        `tuple[str, CaptionResult]`: the `custom_id` and the result: the answer's text and usage for HTTP 200,
        else `text=None` and the error (a refused, empty or malformed answer is an error too).

    Raises:
        `ValueError`: the line is not JSON, has no string `custom_id`, or has neither a response nor an error.
    """
    from .captioners.openai_compatible import read_completion

    try:
        record = json.loads(line)
    except ValueError as error:
        raise ValueError(f"not valid JSON ({error})") from None
    if not isinstance(record, dict) or not isinstance(record.get("custom_id"), str) or not record["custom_id"]:
        raise ValueError("no string 'custom_id'")
    custom_id, error, response = record["custom_id"], record.get("error"), record.get("response")
    if error:
        if isinstance(error, dict):
            error = f"{error.get('code') or 'error'}: {error.get('message') or ''}".strip()
        return custom_id, CaptionResult(text=None, error=f"batch error {error}")
    if isinstance(response, dict) and "choices" in response and "body" not in response:
        response = {"status_code": 200, "body": response}  # engines that write the completion itself as response
    if not isinstance(response, dict) or not isinstance(response.get("body"), dict):
        raise ValueError("neither a 'response' with a 'body' nor an 'error'")
    status, body = response.get("status_code"), response["body"]
    if status != 200:
        message = body.get("error", body)
        if isinstance(message, dict):
            message = message.get("message", message)
        return custom_id, CaptionResult(text=None, error=f"HTTP {status}: {message}")
    text, problem, usage = read_completion(body)
    return custom_id, CaptionResult(text=text, error=None if text is not None else problem, usage=usage)
