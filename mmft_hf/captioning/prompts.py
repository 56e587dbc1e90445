"""Caption prompts: the MMFT template, caption types, domain words and class-name normalisation (method.md §2)."""

from __future__ import annotations

import re
import string

# The paper's prompt (overview figure; the official code uses the same text). `{characteristic}` is the
# caption type ("visual", "shape", "texture", ...); the template says "characteristics" after it.
PROMPT_TEMPLATE = (
    "To differentiate this {class_name} photo from other {domain} photos, describe its primary {characteristic} "
    "characteristics based on the photo in {words} words."
)
DEFAULT_WORDS = 50

# One caption per type and image: 3 captions per image by default.
CAPTION_TYPES = ("visual", "shape", "texture")
# Further characteristic words defined by the reference code (probably ablations). Any other word works too.
EXTRA_CAPTION_TYPES = ("context", "spatial", "petals", "color", "symbols")

# A detailed caption of several sentences (ShareGPT4V/DreamLIP-style long captions), for
# `caption_sampling="sentence"`: it is longer than CLIP's 77 tokens, and training draws one sentence at a time.
LONG_CAPTION_TYPE = "long"
LONG_PROMPT_TEMPLATE = (
    "To differentiate this {class_name} photo from other {domain} photos, describe it in detail: the main object, "
    "its parts, shape, colors and texture, then its surroundings and the background. Write several complete "
    "sentences based on the photo in about {words} words."
)
# Caption types with a prompt of their own (used in place of the default `PROMPT_TEMPLATE`, not of a custom one).
TYPE_PROMPT_TEMPLATES = {LONG_CAPTION_TYPE: LONG_PROMPT_TEMPLATE}
# Words asked per caption type, where it differs from the run's `words` (default `DEFAULT_WORDS`).
CAPTION_WORDS = {LONG_CAPTION_TYPE: 150}

TEMPLATE_FIELDS = ("class_name", "domain", "characteristic", "words")

# Domain word per benchmark (method.md §2). Keys are the preset names used by `mmft_hf.captioning.builder.PRESETS`.
DOMAINS = {
    "oxford_pets": "pets",
    "flowers102": "flowers",
    "dtd": "textures",
    "gtsrb": "traffic signs",
    "stanford_cars": "cars",
    "fgvc_aircraft": "aircrafts",
    "cub200": "birds",
    "cifar10": "general objects",
    "cifar100": "general objects",
    "imagenet": "general objects",
    "caltech101": "general objects",
    "eurosat": "satellite",
    "food101": "food",
}

# CUB names look like "001.Black_footed_Albatross". Digits then a period not followed by a digit, so a name
# such as "2.5 ton truck" keeps its number.
_NUMERIC_PREFIX = re.compile(r"^\s*\d+\.(?!\d)\s*")


def read_class_names(path: str) -> list[str]:
    """Reads one class name per line of a UTF-8 text file, in label-id order (line `i` names label `i`).

    Args:
        path (`str`): the file (`--class_names`, `--retention_class_names`).

    Raises:
        `ValueError`: the file is empty or has a blank line.
    """
    with open(path, encoding="utf-8") as handle:
        names = [line.strip() for line in handle.read().rstrip().splitlines()]
    if not names or not all(names):
        raise ValueError(f"Class-names file {path!r} needs one class name per line, without blank lines.")
    return names


def normalize_class_name(name: str) -> str:
    """Normalises a class name for prompts and class templates.

    Lower-cases, turns `_` and `-` into spaces, drops a CUB-style numeric prefix (`"001."`) and collapses runs of
    whitespace: `"001.Black_footed_Albatross"` becomes `"black footed albatross"`.

    Args:
        name (`str`): the raw class name, e.g. a `ClassLabel` name.

    Returns:
        `str`: the normalised name.
    """
    if not isinstance(name, str):
        raise TypeError(f"Class names must be strings, got {type(name).__name__}: {name!r}.")
    text = _NUMERIC_PREFIX.sub("", name)
    text = re.sub(r"[_\-]+", " ", text.lower())
    text = " ".join(text.split())
    if not text:
        raise ValueError(f"Class name {name!r} is empty after normalisation; give the class a descriptive name.")
    return text


def template_fields(template: str) -> set[str]:
    """The replacement fields named in a `str.format` template."""
    return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}


def validate_template(template: str) -> str:
    """Checks a custom prompt template and returns it.

    A template is a `str.format` string that must contain `{class_name}` and may use `{domain}`,
    `{characteristic}` and `{words}`; any other field (or a positional `{}`) is an error.

    Args:
        template (`str`): the template.

    Returns:
        `str`: the template, unchanged.
    """
    if not isinstance(template, str) or not template.strip():
        raise ValueError("The prompt template must be a non-empty string containing '{class_name}'.")
    try:
        fields = template_fields(template)
    except ValueError as error:  # unbalanced braces
        raise ValueError(f"The prompt template is not a valid format string ({error}): {template!r}.") from None
    if "class_name" not in fields:
        raise ValueError(f"The prompt template must contain '{{class_name}}', got {template!r}.")
    unknown = sorted(fields - set(TEMPLATE_FIELDS))
    if unknown:
        raise ValueError(
            f"The prompt template uses unknown field(s) {unknown}; allowed: {list(TEMPLATE_FIELDS)} "
            "(write literal braces as '{{' and '}}')."
        )
    return template


def validate_caption_types(caption_types) -> tuple[str, ...]:
    """Checks caption types (characteristic words): non-empty, distinct strings without braces."""
    if isinstance(caption_types, str):
        caption_types = (caption_types,)
    types = tuple(caption_types)
    if not types:
        raise ValueError(f"caption_types must name at least one characteristic, e.g. {CAPTION_TYPES}.")
    for kind in types:
        if not isinstance(kind, str) or not kind.strip() or "{" in kind or "}" in kind:
            raise ValueError(f"Invalid caption type {kind!r}: use a characteristic word such as 'shape'.")
        if "," in kind:
            raise ValueError(
                f"Invalid caption type {kind!r}: give each characteristic separately, e.g. ('shape', 'texture')."
            )
    if len(set(types)) != len(types):
        raise ValueError(f"caption_types has duplicates: {types}.")
    return types


def requested_words(caption_type: str, words: int = DEFAULT_WORDS) -> int:
    """The caption length in words asked for `caption_type`: its own count in `CAPTION_WORDS` (e.g. 150 for
    `"long"`), else `words`, the run's setting for the short caption types."""
    return CAPTION_WORDS.get(caption_type, words)


def build_prompt(
    class_name: str,
    domain: str,
    characteristic: str,
    words: int = DEFAULT_WORDS,
    template: str = PROMPT_TEMPLATE,
) -> str:
    """Builds the captioning prompt for one image.

    A caption type listed in `CAPTION_WORDS` asks for its own number of words (`requested_words`: 150 for
    `"long"`). With the default template, a type listed in `TYPE_PROMPT_TEMPLATES` also has its own template (the
    `"long"` type asks for a detailed caption of several sentences); a custom `template` serves every type.

    Args:
        class_name (`str`): the class of the image, already normalised (see `normalize_class_name`).
        domain (`str`): the dataset's domain word, e.g. `"textures"` (see `DOMAINS`).
        characteristic (`str`): the caption type, e.g. `"visual"`, `"shape"`, `"texture"` or `"long"`.
        words (`int`, defaults to 50): the requested caption length in words (types in `CAPTION_WORDS` excepted).
        template (`str`, defaults to `PROMPT_TEMPLATE`): a custom template (see `validate_template`).

    Returns:
        `str`: the prompt text.
    """
    validate_template(template)
    if not isinstance(words, int) or words <= 0:
        raise ValueError(f"words must be a positive integer, got {words!r}.")
    words = requested_words(characteristic, words)
    if template == PROMPT_TEMPLATE:
        template = TYPE_PROMPT_TEMPLATES.get(characteristic, template)
    if not isinstance(domain, str) or not domain.strip():
        raise ValueError(f"domain must be a non-empty word such as 'textures', got {domain!r}.")
    validate_caption_types((characteristic,))
    return template.format(class_name=class_name, domain=domain.strip(), characteristic=characteristic, words=words)
