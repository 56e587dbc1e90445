"""One request per image for every caption type: the joint prompt, its JSON schema and a forgiving reply parser.

The image is most of a request's input tokens, so asking for all caption types at once pays for it once instead
of once per type. The joint prompt is built from the per-type prompts themselves (the paper's prompt, or a custom
template, once per type), so each caption answers exactly the question the per-type protocol asks; the reply is a
JSON object with one field per caption type. Servers that support `response_format` get a JSON schema; for the
others (and for models that wrap JSON in prose or code fences) `parse_joint_reply` finds the object in the text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

JOINT_INSTRUCTION = (
    "Answer each of the following {count} requests about this photo. Reply with only a JSON object whose keys are "
    "{keys} and whose values are the answers, as plain text.\n"
)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", flags=re.DOTALL | re.IGNORECASE)


def build_joint_prompt(prompts_by_type: dict[str, str]) -> str:
    """The one prompt that asks for every caption type of an image.

    Args:
        prompts_by_type (`dict[str, str]`): caption type -> its full per-type prompt, in caption-type order.

    Returns:
        `str`: the instruction, then one line per type: `"<type>": <per-type prompt>`.
    """
    if not prompts_by_type:
        raise ValueError("A joint prompt needs at least one caption type.")
    keys = ", ".join(json.dumps(kind) for kind in prompts_by_type)
    lines = "\n".join(f"{json.dumps(kind)}: {prompt}" for kind, prompt in prompts_by_type.items())
    return JOINT_INSTRUCTION.format(count=len(prompts_by_type), keys=keys) + lines


def joint_response_format(caption_types: Sequence[str]) -> dict:
    """An OpenAI `response_format` (strict JSON schema) with one required string field per caption type."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": "captions",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {kind: {"type": "string"} for kind in caption_types},
                "required": list(caption_types),
                "additionalProperties": False,
            },
        },
    }


def parse_joint_reply(text: str, caption_types: Sequence[str]) -> tuple[dict[str, str], str]:
    """Reads the captions out of a joint reply.

    Accepts a bare JSON object, one inside a ```json fence, or one surrounded by prose (the first `{` to the last
    `}`). Keys are matched case-insensitively; a value that is not a non-empty string is not a caption.

    Args:
        text (`str`): the model's answer.
        caption_types (`Sequence[str]`): the types asked for.

    Returns:
        `tuple[dict[str, str], str]`: the captions found (type -> text, stripped) and, when some are missing, why
        (empty when every type was found).
    """
    candidates = [text.strip(), *(match.strip() for match in _FENCE.findall(text))]
    if "{" in text and "}" in text:
        candidates.append(text[text.index("{") : text.rindex("}") + 1])
    value = None
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            break
        value = None
    if value is None:
        return {}, f"the joint reply is not a JSON object: {text[:80]!r}"
    by_lower = {str(key).strip().lower(): item for key, item in value.items()}
    found = {}
    for kind in caption_types:
        item = by_lower.get(kind.lower())
        if isinstance(item, str) and item.strip():
            found[kind] = item.strip()
    missing = [kind for kind in caption_types if kind not in found]
    return found, (f"the joint reply has no usable caption for {missing}" if missing else "")
