"""The quality gate: which answers may become captions. The same rule for every backend and path.

An answer is never stored as a caption when it is empty, refused (OpenAI's `refusal` field or a plain-text refusal
such as "I'm sorry, but I can't help with that."), cut short or filtered (`finish_reason` other than a natural
stop), or absurdly longer than the prompt asked for. `rejection_reason` says which; callers re-ask (synchronous and
batch runs) or report and leave the caption missing (imported results), and count the reasons in their summary.

An answer cut by the token limit (`finish_reason="length"`) would likely be cut, and paid for, again at the same
limit: it is re-asked with the limit doubled per re-ask, up to `MAX_TOKEN_LIMIT_FACTOR` times the configured one
(`raised_token_limit`).
"""

from __future__ import annotations

import re

# An answer may run this many times the words the prompt asks for (models overshoot "in 20 words" freely, and a
# joint reply wraps its captions in JSON), but never fewer than `MIN_WORDS_ALLOWED` words.
WORDS_MULTIPLIER = 4
MIN_WORDS_ALLOWED = 100
# Whatever the prompt: no caption is this long. It also bounds answers to prompts that name no length.
MAX_CHARACTERS = 20_000

# `finish_reason` values meaning the model ended its answer itself. OpenAI, Gemini, vLLM, SGLang and Ollama say
# "stop"; some servers pass through their native names. `None` (a server that omits the field, or a results file
# written without it) is accepted: it says nothing against the answer, and the length checks still apply.
NATURAL_STOPS = frozenset({"stop", "eos", "eos_token", "end_turn", "stop_sequence"})
# In the reason of an answer cut by the token limit (also in "empty (finish_reason=length)").
CUT = "finish_reason=length"
# A cut answer is re-asked with its token limit doubled, at most this many times the configured limit: far enough for
# an answer of the length asked to fit, bounded so that a model that rambles on is not paid ever more.
MAX_TOKEN_LIMIT_FACTOR = 4

# "in 50 words", "in about 150 words", "(20 words)", "at most 30 words": the number right before "word(s)", with
# at most two short words between (e.g. "50 to 60 words" counts 60, the larger).
_WORDS_ASKED = re.compile(r"\b(\d{1,5})(?:\s+[a-z-]{1,12}){0,2}?\s+words?\b", flags=re.IGNORECASE)

# Plain-text refusals. Only the opening of the answer is matched, and only a first-person refusal or an apology
# followed by one: a caption describes the image and never opens that way, while a caption that mentions an
# apology ("a sign reading 'Sorry, we are closed'") does not match.
_NEGATION = (
    r"(?:can(?:not|'t|’t| not)|could(?:n't|n’t| not)|won(?:'t|’t)|will not|am (?:not able|unable)|'m "
    r"(?:not able|unable)|’m (?:not able|unable)|do(?:n't|n’t| not)|must (?:decline|refuse)|am not comfortable|"
    r"'m not comfortable|’m not comfortable)"
)
_REFUSAL = re.compile(
    r"^\W*(?:"
    rf"(?:i\s*(?:'m|’m| am)\s+(?:sorry|afraid)|sorry|apologies|my apologies|i apologi[sz]e|unfortunately)\b[^.!?]{{0,40}}?"
    rf"\b(?:i|we)\s*{_NEGATION}"
    rf"|i\s*{_NEGATION}\s+(?:help|assist|provide|describe|comply|fulfil|process|identify|analy[sz]e|see|view|"
    r"access|determine|generate|create|answer|respond|complete|do that|support|engage|share|open|display|"
    r"perceive|look)"
    r"|i\s*(?:'m|’m| am)\s+(?:unable|not able)\s+to\b"
    r"|as an ai\b"
    r"|(?:there is|there's|i see) no image\b"
    r")",
    flags=re.IGNORECASE,
)


def max_words_asked(prompt: str) -> int | None:
    """The number of words a prompt asks for, read from its text.

    The MMFT prompt ends "... based on the photo in 50 words."; a one-request-per-image (joint) prompt repeats one
    such request per caption type, and its reply holds all of them, so the counts add up. Reading the prompt
    itself works for every caption type (e.g. a `long` type asking 150 words) and for custom templates.

    Args:
        prompt (`str`): the full prompt text sent with the image.

    Returns:
        `int` or `None`: the total words asked for, or `None` when the prompt names no length (then only the
        absolute cap of `MAX_CHARACTERS` applies).
    """
    counts = [int(match) for match in _WORDS_ASKED.findall(prompt or "")]
    counts = [count for count in counts if count > 0]
    return sum(counts) if counts else None


def max_words_allowed(words_asked: int | None) -> int | None:
    """The longest answer, in words, accepted for a prompt asking `words_asked` words (`None`: no word limit)."""
    if words_asked is None:
        return None
    return max(WORDS_MULTIPLIER * words_asked, MIN_WORDS_ALLOWED)


def is_plain_text_refusal(text: str) -> bool:
    """Whether an answer opens with a refusal ("I'm sorry, but I can't help with that.", "I cannot assist ...",
    "As an AI ..."). Conservative: captions that merely contain such words elsewhere are not refusals."""
    return bool(_REFUSAL.match(text.strip()[:200]))


def rejection_reason(
    text: str | None,
    *,
    finish_reason: str | None = None,
    refusal: str | None = None,
    max_words: int | None = None,
) -> str | None:
    """Why an answer must not become a caption, or `None` when it is usable.

    Args:
        text (`str`, *optional*): the answer (after removing any `<think>` block).
        finish_reason (`str`, *optional*): the completion's `finish_reason`; `None` means the server did not say,
            which is accepted. Anything but a natural stop (`"stop"`, see `NATURAL_STOPS`) is rejected:
            `"length"` is a caption cut by the token limit, `"content_filter"` a filtered one.
        refusal (`str`, *optional*): OpenAI's `message.refusal`; any non-empty value rejects the answer.
        max_words (`int`, *optional*): the words the prompt asked for (see `max_words_asked`); answers longer than
            `max_words_allowed(max_words)` words are rejected. `None` checks only `MAX_CHARACTERS`.

    Returns:
        `str` or `None`: a short reason ("empty", "refusal", "finish_reason=length", "too long: 3021 words for ~20
        asked", ...) or `None`.
    """
    if refusal is not None and str(refusal).strip():
        return f"refusal: {_clip(str(refusal))}"
    if text is None or not text.strip():
        return (
            "empty"
            if finish_reason in NATURAL_STOPS or finish_reason is None
            else f"empty (finish_reason={finish_reason})"
        )
    if finish_reason is not None and finish_reason not in NATURAL_STOPS:
        return f"finish_reason={finish_reason}"
    if len(text) > MAX_CHARACTERS:
        return f"too long: {len(text)} characters (at most {MAX_CHARACTERS} accepted)"
    allowed = max_words_allowed(max_words)
    words = len(text.split())
    if allowed is not None and words > allowed:
        return f"too long: {words} words for ~{max_words} asked"
    if is_plain_text_refusal(text):
        return f"refusal: {_clip(text)}"
    return None


def is_cut(reason: str) -> bool:
    """Whether a rejection reason (see `rejection_reason`) is an answer cut by the token limit."""
    return CUT in reason


def raised_token_limit(limit: int, max_tokens: int) -> int:
    """The token limit to re-ask an answer cut at `limit` with: doubled, at most `MAX_TOKEN_LIMIT_FACTOR × max_tokens`.

    Args:
        limit (`int`): the limit the cut answer was generated under.
        max_tokens (`int`): the captioner's configured limit.

    Returns:
        `int`: the new limit (never lower than `limit`).
    """
    return max(limit, min(2 * limit, MAX_TOKEN_LIMIT_FACTOR * max_tokens))


def _clip(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
