"""The quality gate: real refusals, cut and runaway answers are rejected; real captions (even odd ones) are not."""

import pytest

from mmft_hf.captioning.joint import build_joint_prompt
from mmft_hf.captioning.prompts import build_prompt
from mmft_hf.captioning.quality import (
    MAX_CHARACTERS,
    is_plain_text_refusal,
    max_words_allowed,
    max_words_asked,
    rejection_reason,
)

CAPTION = (
    "A tabby cat with dense striped fur curls on a knitted blanket; its pointed ears and long whiskers stand out "
    "against the pale wool."
)

REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I’m sorry, but I can’t assist with that request.",
    "I am sorry, I cannot describe this image.",
    "Sorry, I can't identify people in images.",
    "I cannot assist with this request.",
    "I can't help with that.",
    "I'm unable to view images.",
    "I am not able to process this photo.",
    "As an AI language model, I cannot see images.",
    "As an AI, I don't have the ability to view images.",
    "Unfortunately, I cannot provide a description of this photo.",
    "I apologize, but I won't describe this content.",
    "  \"I'm afraid I can't do that.\"",
    "There is no image attached to your message.",
]

CAPTIONS = [
    CAPTION,
    'A red shop sign reading "Sorry, we\'re closed" hangs on a glass door with a brass handle.',
    "A hand-painted board saying 'I cannot help falling in love' above a café counter.",
    "Weathered stone wall; graffiti reads I'M SORRY in dripping blue letters across the bricks.",
    "Unfortunately placed shadows hide part of the dial, but the chrome bezel and black face are clear.",
    "An AI robot toy with round eyes and a blue plastic chest panel.",
    "Sorry-looking wilted tulips droop in a chipped ceramic vase.",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_plain_text_refusals_are_rejected(text):
    assert is_plain_text_refusal(text)
    assert rejection_reason(text, finish_reason="stop", refusal=None, max_words=50).startswith("refusal")


@pytest.mark.parametrize("text", CAPTIONS)
def test_real_captions_pass_even_when_they_mention_apologies(text):
    assert not is_plain_text_refusal(text)
    assert rejection_reason(text, finish_reason="stop", refusal=None, max_words=50) is None


def test_refusal_field_wins_even_with_text():
    reason = rejection_reason(CAPTION, finish_reason="stop", refusal="I can't help with that.", max_words=50)
    assert reason == "refusal: I can't help with that."


@pytest.mark.parametrize("text", [None, "", "   \n\t "])
def test_empty_answers_are_rejected(text):
    assert rejection_reason(text, finish_reason="stop", refusal=None, max_words=50) == "empty"
    assert rejection_reason(text, finish_reason="length", refusal=None, max_words=50) == "empty (finish_reason=length)"


@pytest.mark.parametrize("finish_reason", ["length", "content_filter", "tool_calls", "function_call"])
def test_unnatural_finish_reasons_are_rejected(finish_reason):
    assert rejection_reason(CAPTION, finish_reason=finish_reason, refusal=None, max_words=50) == (
        f"finish_reason={finish_reason}"
    )


@pytest.mark.parametrize("finish_reason", ["stop", "eos", "end_turn", None])
def test_natural_or_unknown_finish_reasons_pass(finish_reason):
    assert rejection_reason(CAPTION, finish_reason=finish_reason, refusal=None, max_words=50) is None


def test_length_limit_scales_with_words_asked():
    # 20 asked: up to max(4 * 20, 100) = 100 words pass; 101 do not. 150 asked: 600 pass, 601 do not.
    assert max_words_allowed(20) == 100 and max_words_allowed(150) == 600 and max_words_allowed(None) is None
    assert rejection_reason("word " * 100, finish_reason="stop", refusal=None, max_words=20) is None
    assert rejection_reason("word " * 101, finish_reason="stop", refusal=None, max_words=20) == (
        "too long: 101 words for ~20 asked"
    )
    assert rejection_reason("word " * 600, finish_reason="stop", refusal=None, max_words=150) is None
    assert rejection_reason("word " * 601, finish_reason="stop", refusal=None, max_words=150).startswith("too long")
    # No length asked: only the absolute cap applies.
    assert rejection_reason("word " * 3000, finish_reason="stop", refusal=None, max_words=None) is None


def test_absolute_character_cap_applies_whatever_was_asked():
    huge = "x" * (MAX_CHARACTERS + 1)
    for max_words in (None, 10**6):
        reason = rejection_reason(huge, finish_reason="stop", refusal=None, max_words=max_words)
        assert reason == f"too long: {MAX_CHARACTERS + 1} characters (at most {MAX_CHARACTERS} accepted)"
    assert rejection_reason("x" * MAX_CHARACTERS, finish_reason="stop", refusal=None, max_words=None) is None


def test_words_asked_read_from_real_prompts():
    assert max_words_asked(build_prompt("tabby cat", "pets", "visual")) == 50
    assert max_words_asked(build_prompt("tabby cat", "pets", "long", words=150)) == 150
    assert max_words_asked(build_prompt("2.5 ton truck", "cars", "shape", words=20)) == 20
    joint = build_joint_prompt({kind: build_prompt("cat", "pets", kind, words=30) for kind in ("visual", "shape")})
    assert max_words_asked(joint) == 60  # one reply holds both captions
    assert max_words_asked("Describe it in about 40 descriptive words.") == 40
    assert max_words_asked("Describe it in 50 to 60 words.") == 60
    assert max_words_asked("Describe the {class_name} briefly.") is None
    assert max_words_asked("") is None
