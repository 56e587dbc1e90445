"""Captions as training units: whole captions, or their sentences (DreamLIP-style sub-captions of long captions).

`split_sentences` is a small rule-based splitter for the English an MLLM writes: it keeps abbreviations ("e.g.",
"Dr.", "approx."), decimals ("3.5"), initials and mid-sentence ellipses inside their sentence, and never returns an
empty piece. `caption_units` is what one caption contributes under a `caption_sampling` setting; the collator draws
from these units and the class prototypes average them, so inference sees what training saw.
"""

from __future__ import annotations

import re

# How a training text is drawn from a row's captions: one whole caption, or one sentence of one caption.
CAPTION_SAMPLINGS = ("caption", "sentence")

# Words whose period never ends a sentence (compared in lower case, without the final period).
_NEVER_FINAL = frozenset(
    "dr mr mrs ms mx prof sr jr st mt vs approx appr ca cf e.g i.e eg ie esp incl fig figs resp vol al viz "
    "w.r.t".split()
)
# Words whose period ends a sentence only when an upper-case word follows ("... red, blue, etc. The ...").
_SOMETIMES_FINAL = frozenset("etc inc ltd co corp ft".split())
# Sentence-final punctuation (a run of it: "?!", "...", "…"), then closing quotes or brackets, then white space.
_BOUNDARY = re.compile(r"([.!?…]+)([\"'”’)\]]*)\s+")
_WORD_BEFORE = re.compile(r"(\S+)$")


def _ends_sentence(text: str, match: re.Match) -> bool:
    """Whether the punctuation matched at `match` (see `_BOUNDARY`) ends a sentence."""
    punctuation, following = match.group(1), text[match.end() : match.end() + 1]
    starts_upper = following.isupper() or (following != "" and following in "\"'“‘([")
    if "!" in punctuation or "?" in punctuation:
        return True
    if punctuation != ".":  # an ellipsis: a pause inside a sentence unless a new sentence starts after it
        return starts_upper
    before = _WORD_BEFORE.search(text, 0, match.start())
    word = before.group(1).lstrip("\"'“‘([").lower() if before else ""
    if word in _NEVER_FINAL:
        return False
    if len(word) == 1 and word.isalpha() and before.group(1)[-1].isupper():  # an initial: "J. Smith"
        return False
    if word in _SOMETIMES_FINAL or "." in word:  # "etc.", "U.S.", "a.m."
        return starts_upper
    return True


def split_sentences(text: str) -> list[str]:
    """Splits a caption into sentences, each stripped; pieces without a letter or digit are dropped.

    A sentence ends at `!`, `?` or `.` followed by white space, and at a line break. A period does not end one after
    an abbreviation that never ends a sentence (`"e.g."`, `"i.e."`, `"Dr."`, `"approx."`, `"vs."`, `"cf."`, ...) or
    after a single upper-case initial; after `"etc."` and dotted abbreviations (`"U.S."`) and after an ellipsis
    (`"..."`, `"…"`), only when the next word starts in upper case. Decimals (`"3.5 cm"`) have no white space after
    the period, so they never split.

    Args:
        text (`str`): the caption.

    Returns:
        `list[str]`: the sentences in order, with their final punctuation; `[]` for a blank text.
    """
    if not isinstance(text, str):
        raise TypeError(f"split_sentences needs a string, got {type(text).__name__}: {text!r:.80}.")
    sentences = []
    for line in text.splitlines():
        start = 0
        for match in _BOUNDARY.finditer(line):
            if _ends_sentence(line, match):
                sentences.append(line[start : match.end()].strip())
                start = match.end()
        sentences.append(line[start:].strip())
    return [sentence for sentence in sentences if any(character.isalnum() for character in sentence)]


def caption_units(caption: str, caption_sampling: str = "caption") -> list[str]:
    """The texts one caption contributes under `caption_sampling`: itself (stripped; `[]` when blank) for
    `"caption"`, its sentences (`split_sentences`) for `"sentence"`.

    Args:
        caption (`str`): one caption.
        caption_sampling (`str`, defaults to `"caption"`): one of `CAPTION_SAMPLINGS`.

    Returns:
        `list[str]`: the units, never empty strings.
    """
    if caption_sampling == "sentence":
        return split_sentences(caption)
    if caption_sampling != "caption":
        raise ValueError(f"caption_sampling must be one of {CAPTION_SAMPLINGS}, got {caption_sampling!r}.")
    caption = caption.strip()
    return [caption] if caption else []
