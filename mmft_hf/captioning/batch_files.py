"""Reading the OpenAI Batch API output format, spoken by OpenAI's and Gemini's Batch APIs and by `vllm run-batch`.

A request line is `{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}` (written by
`OpenAIBatchCaptioner.request_line`; `custom_id` is the caption cache key, or for a one-request-per-image request
the key of the joint request). An output line is `{"id", "custom_id", "response": {"status_code", "request_id",
"body"}, "error"}`; lines of failed requests (in the error file) carry an HTTP status other than 200, or an `error`
object and no response, such as `{"code": "batch_expired"}` for a request the provider never ran.
"""

from __future__ import annotations

import json

from .captioners.base import CaptionResult


def parse_output_line(line: str) -> tuple[str, CaptionResult]:
    """Reads one line of a Batch API output or error file.

    Args:
        line (`str`): the JSON line.

    Returns:
        `tuple[str, CaptionResult]`: the `custom_id` and the result: the answer's text, usage, `finish_reason` and
        `refusal` for HTTP 200 (the quality gate judges them), else `text=None` and the error. A line with an
        `error` object and no response was never run by the provider: `processed=False` (not billed).

    Raises:
        `ValueError`: the line is not JSON, has no string `custom_id`, or has neither a response nor an error.
    """
    from .captioners.openai_compatible import parse_completion

    try:
        record = json.loads(line)
    except ValueError as error:
        raise ValueError(f"not valid JSON ({error})") from None
    if not isinstance(record, dict) or not isinstance(record.get("custom_id"), str) or not record["custom_id"]:
        raise ValueError("no string 'custom_id'")
    custom_id, error, response = record["custom_id"], record.get("error"), record.get("response")
    if isinstance(response, dict) and "choices" in response and "body" not in response:
        response = {"status_code": 200, "body": response}  # engines that write the completion itself as response
    if error and not isinstance(response, dict):
        if isinstance(error, dict):
            error = f"{error.get('code') or 'error'}: {error.get('message') or ''}".strip()
        return custom_id, CaptionResult(text=None, error=f"batch error {error}", processed=False)
    if not isinstance(response, dict) or not isinstance(response.get("body"), dict):
        raise ValueError("neither a 'response' with a 'body' nor an 'error'")
    status, body = response.get("status_code"), response["body"]
    if status != 200:
        message = body.get("error", body)
        if isinstance(message, dict):
            message = message.get("message", message)
        return custom_id, CaptionResult(text=None, error=f"HTTP {status}: {message}")
    return custom_id, parse_completion(body)
