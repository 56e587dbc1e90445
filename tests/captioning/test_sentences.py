"""Tests for mmft_hf.captioning.sentences: the sentence splitter against hand-made references."""

import pytest

from mmft_hf.captioning.sentences import CAPTION_SAMPLINGS, caption_units, split_sentences

# (text, the sentences a careful reader marks by hand)
REFERENCES = [
    ("A red circle. It is round.", ["A red circle.", "It is round."]),
    ("a red circle. the background is gray", ["a red circle.", "the background is gray"]),
    ("Is it a cat? Yes! It sleeps.", ["Is it a cat?", "Yes!", "It sleeps."]),
    ("Wait?! Then it left.", ["Wait?!", "Then it left."]),
    # abbreviations that never end a sentence, whatever follows
    ("Dr. Smith took it, e.g. at noon. Then he left.", ["Dr. Smith took it, e.g. at noon.", "Then he left."]),
    ("Spots, i.e. Small dots, cover it. Fine.", ["Spots, i.e. Small dots, cover it.", "Fine."]),
    ("It is approx. 30 cm wide, cf. Fig. 2 of the set.", ["It is approx. 30 cm wide, cf. Fig. 2 of the set."]),
    ("A cat vs. a dog. Both sit.", ["A cat vs. a dog.", "Both sit."]),
    # decimals and numbers
    ("The petal is 3.5 cm long. The stem is 0.75 m.", ["The petal is 3.5 cm long.", "The stem is 0.75 m."]),
    ("Version 2.0.1 ships. Next.", ["Version 2.0.1 ships.", "Next."]),
    # ellipses: a pause inside a sentence unless a capitalised sentence follows
    ("The edges... fade away. Then... Nothing.", ["The edges... fade away.", "Then...", "Nothing."]),
    ("It trails off… and returns. Done…", ["It trails off… and returns.", "Done…"]),
    # etc. and dotted abbreviations end a sentence only before a capital
    ("Reds, blues, etc. The end.", ["Reds, blues, etc.", "The end."]),
    ("Reds, blues, etc. and more.", ["Reds, blues, etc. and more."]),
    (
        "A U.S. flag flies. It is in the U.S. Next to it, a tree.",
        ["A U.S. flag flies.", "It is in the U.S.", "Next to it, a tree."],
    ),
    ("Open at 9 a.m. daily. Closed later.", ["Open at 9 a.m. daily.", "Closed later."]),
    # initials, quotes and brackets stay with their sentence
    ("J. R. Smith drew it. Nice.", ["J. R. Smith drew it.", "Nice."]),
    ('He said "stop." Then he left.', ['He said "stop."', "Then he left."]),
    ("(The cat sleeps.) The dog barks.", ["(The cat sleeps.)", "The dog barks."]),
    # line breaks end sentences; pieces without a letter or digit are dropped (no empty pieces)
    ("Line one\n\n- Line two.\n", ["Line one", "- Line two."]),
    ("One.  . Two. ...", ["One.", "Two."]),
    ("No final period", ["No final period"]),
    ("   ", []),
    ("", []),
    ("...", []),
]


@pytest.mark.parametrize(("text", "expected"), REFERENCES)
def test_split_sentences_matches_hand_made_references(text, expected):
    assert split_sentences(text) == expected


@pytest.mark.parametrize(("text", "_"), REFERENCES)
def test_split_sentences_loses_no_text_and_makes_no_empty_piece(text, _):
    """Every non-space character of the text is in exactly one piece, in order (dropped pieces have none that is
    alphanumeric), and no piece is empty or padded."""
    pieces = split_sentences(text)
    assert all(piece and piece == piece.strip() for piece in pieces)
    kept = "".join("".join(piece.split()) for piece in pieces)
    squeezed = "".join(text.split())
    position = 0
    for character in kept:  # the pieces are a subsequence of the text
        position = squeezed.index(character, position) + 1
    assert sorted(c for c in kept if c.isalnum()) == sorted(c for c in squeezed if c.isalnum())


def test_split_sentences_refuses_non_strings():
    with pytest.raises(TypeError, match="needs a string"):
        split_sentences(None)


def test_caption_units():
    assert CAPTION_SAMPLINGS == ("caption", "sentence")
    assert caption_units("  A red one. Round.  ") == ["A red one. Round."]
    assert caption_units("  A red one. Round.  ", "sentence") == ["A red one.", "Round."]
    assert caption_units("   ") == [] and caption_units("   ", "sentence") == []
    with pytest.raises(ValueError, match="caption_sampling must be one of"):
        caption_units("x", "word")


def test_caption_stats_count_the_tokens_each_sampling_reads():
    """A hand count with a tokenizer that makes every word and every period one token: the prefix "a photo of a
    red circle." is 7 tokens + start/end = 9, so a 30-token limit leaves 21 caption tokens per text."""
    import datasets

    from mmft_hf.captioning.stats import caption_stats
    from mmft_hf.synthetic import build_word_tokenizer

    words = [f"w{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(30)]  # letters only: one token each
    long = " ".join(" ".join(words[10 * s : 10 * s + 10]) + "." for s in range(3))  # 3 sentences of 11 tokens
    short = " ".join(words[:5])  # one sentence, 5 tokens
    tokenizer = build_word_tokenizer(["a", "photo", "of", "red", "circle", *words])
    assert len(tokenizer(long)["input_ids"]) == 33 + 2 and len(tokenizer("a photo of a red circle.")["input_ids"]) == 9
    features = datasets.Features({"label": datasets.ClassLabel(names=["red circle"]),
                                  "captions": datasets.List(datasets.Value("string"))})  # fmt: skip
    dataset = datasets.Dataset.from_dict({"label": [0, 0], "captions": [[long], [short]]}, features=features)
    read = caption_stats(dataset, tokenizer, max_length=30)["all"]["tokens_read"]
    assert read["caption_tokens"]["mean"] == (33 + 5) / 2
    # a whole caption: 21 of the long one's 33 tokens, all 5 of the short one's
    assert read["caption"]["per_draw"]["mean"] == (21 + 5) / 2
    assert read["caption"]["fraction_read"] == pytest.approx((21 + 5) / 38)
    assert read["caption"]["units_per_caption"]["mean"] == 1
    # a sentence: 11 tokens per draw of the long caption, and over a run every token of both
    assert read["sentence"]["per_draw"]["mean"] == (11 + 5) / 2
    assert read["sentence"]["fraction_read"] == 1.0
    assert (read["sentence"]["units_per_caption"]["min"], read["sentence"]["units_per_caption"]["max"]) == (1, 3)
    # a limit the prefix alone fills reads nothing
    assert caption_stats(dataset, tokenizer, max_length=9)["all"]["tokens_read"]["sentence"]["fraction_read"] == 0
