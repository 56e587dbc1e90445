"""Offline building blocks: a synthetic captioned image dataset and a small CLIP built from a config.

They power the embedded default of `examples/finetune.py` and the test fixtures. Nothing here touches a hub:
the images are drawn with PIL, the captions describe what was drawn, and the tokenizer vocabulary is built in
memory from the words the captions use.
"""

from __future__ import annotations

import random
import re

import datasets
from PIL import Image, ImageDraw
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
}
BACKGROUNDS = {"gray": (128, 128, 128), "white": (235, 235, 235), "black": (25, 25, 25)}
SHAPE_WORDS = {
    "circle": "round curved outline with no corners",
    "square": "four straight edges and four right angle corners",
    "triangle": "three straight edges meeting in sharp pointed corners",
    "cross": "two thick bars crossing at the center like a plus sign",
}
SIZE_WORDS = {0: "small", 1: "medium", 2: "large"}
DOMAIN = "synthetic shapes"

# Training flags for a small CLIP trained from scratch on the synthetic shapes (examples/finetune.py and
# examples/benchmark.py use them when no model is given): far larger steps than fine-tuning a pre-trained CLIP.
DEMO_TRAINING_ARGUMENTS = [
    "--learning_rate", "1e-3",
    "--per_device_train_batch_size", "32",
    "--per_device_eval_batch_size", "256",
    "--save_total_limit", "1",
    "--logging_steps", "20",
    "--use_cpu", "true",
    "--dataloader_num_workers", "0",
]  # fmt: skip


def synthetic_class_names(num_classes: int = 4) -> list[str]:
    """Class names "color shape", pairing the i-th color with the i-th shape (at most 16 classes)."""
    pairs = [(color, shape) for shape in SHAPES for color in COLORS]
    ordered = sorted(pairs, key=lambda pair: (list(COLORS).index(pair[0]) - SHAPES.index(pair[1])) % len(SHAPES))
    if not 2 <= num_classes <= len(ordered):
        raise ValueError(f"num_classes must be between 2 and {len(ordered)}, got {num_classes}.")
    return [f"{color} {shape}" for color, shape in ordered[:num_classes]]


def draw_shape(class_name: str, rng: random.Random, image_size: int = 32) -> tuple[Image.Image, dict]:
    """Draws one instance of `class_name` ("color shape") at a random size, place and background."""
    color_name, shape = class_name.split(" ")
    background_name = rng.choice(list(BACKGROUNDS))
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[background_name])
    draw = ImageDraw.Draw(image)
    size_index = rng.randrange(3)
    radius = image_size * (0.2 + 0.08 * size_index) * rng.uniform(0.9, 1.1)
    cx = rng.uniform(radius, image_size - radius)
    cy = rng.uniform(radius, image_size - radius)
    jitter = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLORS[color_name])
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=jitter)
    elif shape == "square":
        draw.rectangle(box, fill=jitter)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=jitter)
    else:
        bar = radius / 3
        draw.rectangle((cx - radius, cy - bar, cx + radius, cy + bar), fill=jitter)
        draw.rectangle((cx - bar, cy - radius, cx + bar, cy + radius), fill=jitter)
    vertical = "top" if cy < image_size / 3 else "bottom" if cy > 2 * image_size / 3 else "middle"
    horizontal = "left" if cx < image_size / 3 else "right" if cx > 2 * image_size / 3 else "center"
    attributes = {
        "color": color_name,
        "shape": shape,
        "size": SIZE_WORDS[size_index],
        "background": background_name,
        "position": f"{vertical} {horizontal}",
    }
    return image, attributes


def describe(attributes: dict, caption_type: str) -> str:
    """A caption of one drawn shape, in the spirit of the MMFT caption types (visual, shape, texture), or a detailed
    caption of several sentences (`long`, for `caption_sampling="sentence"`)."""
    a = attributes
    if caption_type == "visual":
        return (
            f"a {a['size']} {a['color']} {a['shape']} near the {a['position']} on a plain {a['background']} background"
        )
    if caption_type == "shape":
        return f"the {a['shape']} has a {SHAPE_WORDS[a['shape']]} and looks {a['size']}"
    if caption_type == "texture":
        return f"a flat solid {a['color']} fill with smooth even texture against a {a['background']} backdrop"
    if caption_type == "long":  # a detailed caption of five sentences, longer than 77 tokens with the class prefix
        return (
            f"The photo shows a plain {a['background']} background with no other object, no text and no visible "
            f"pattern at all. Near the {a['position']} of the frame there is a single {a['size']} object, e.g. a "
            f"simple flat figure drawn by hand. Its fill is a flat solid {a['color']}, with a smooth and even surface "
            f"and sharp clean edges against the {a['background']} backdrop. Looking closely, the {a['shape']} has a "
            f"{SHAPE_WORDS[a['shape']]}. Overall it is a {a['size']} {a['color']} {a['shape']}."
        )
    raise ValueError(f"Unknown caption type {caption_type!r}; use visual, shape, texture or long.")


def make_synthetic_dataset(
    num_classes: int = 4,
    train_per_class: int = 16,
    eval_per_class: int = 8,
    image_size: int = 32,
    caption_types: tuple[str, ...] = ("visual", "shape", "texture"),
    seed: int = 0,
    first_class: int = 0,
) -> datasets.DatasetDict:
    """Builds a captioned dataset of drawn shapes with `train`, `validation` and `test` splits.

    Args:
        num_classes (`int`, defaults to 4): number of "color shape" classes.
        train_per_class (`int`, defaults to 16): training images per class.
        eval_per_class (`int`, defaults to 8): validation and test images per class (each).
        image_size (`int`, defaults to 32): side of the square images in pixels.
        caption_types (`tuple[str, ...]`): one caption per type and image, describing what was drawn.
        seed (`int`, defaults to 0): seeds the drawing.
        first_class (`int`, defaults to 0): skip this many classes of `synthetic_class_names`, e.g. `first_class=8`
            gives classes a dataset of the first 8 does not have (a zero-shot retention set).

    Returns:
        `datasets.DatasetDict` with columns `image` (`Image`), `label` (`ClassLabel`) and `captions`
        (`List(string)`), the same layout as a dataset made by `caption_dataset`.
    """
    names = synthetic_class_names(first_class + num_classes)[first_class:]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=names),
            "captions": datasets.List(datasets.Value("string")),
        }
    )
    rng = random.Random(seed)
    splits = {}
    for split, per_class in (("train", train_per_class), ("validation", eval_per_class), ("test", eval_per_class)):
        rows = {"image": [], "label": [], "captions": []}
        for _ in range(per_class):
            for label, name in enumerate(names):
                image, attributes = draw_shape(name, rng, image_size)
                rows["image"].append(image)
                rows["label"].append(label)
                rows["captions"].append([describe(attributes, kind) for kind in caption_types])
        splits[split] = datasets.Dataset.from_dict(rows, features=features)
    return datasets.DatasetDict(splits)


def _byte_characters() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table: the 256 characters byte-level BPE starts from."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Deterministic BPE: merge the most frequent adjacent pair (ties: smallest pair) until each word is one symbol."""
    segmented = [[*word[:-1], word[-1] + "</w>"] for word in sorted(set(words)) if word]
    merges = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in segmented:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for symbols in segmented:
            index = 0
            while index < len(symbols) - 1:
                if (symbols[index], symbols[index + 1]) == best:
                    symbols[index : index + 2] = [best[0] + best[1]]
                index += 1


def build_word_tokenizer(words: list[str] = (), model_max_length: int = 77) -> CLIPTokenizer:
    """A `CLIPTokenizer` whose vocabulary has every byte plus each of `words` as one token.

    The merges come from a deterministic BPE run (with CLIP's `</w>` end-of-word marker) on `words` until each is a
    single token, so known words encode as one id, any other text still encodes byte by byte, and every process
    that builds the tokenizer from the same words gets the same ids. Token ids: 0 is `<|startoftext|>`, 1 is
    `<|endoftext|>` (also padding).
    """
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for character in _byte_characters():
            vocab[character + suffix] = len(vocab)
    merges = _learn_merges(list(words))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def caption_vocabulary(dataset: datasets.Dataset, caption_column: str = "captions", extra_text: str = "") -> list[str]:
    """Lower-case words appearing in the captions (if any) and class names of `dataset`, plus `extra_text`."""
    captions = dataset[caption_column] if caption_column in dataset.column_names else []
    text = " ".join(" ".join(row) for row in captions)
    text += " " + " ".join(dataset.features["label"].names) + " " + extra_text
    return sorted(set(re.findall(r"[a-z]+", text.lower())))


def build_clip(
    tokenizer: CLIPTokenizer,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    projection_dim: int = 16,
    max_position_embeddings: int = 77,
) -> tuple[CLIPModel, CLIPProcessor]:
    """A randomly initialised `CLIPModel` and matching `CLIPProcessor`, built from configs (no download)."""
    processor = CLIPProcessor(
        tokenizer=tokenizer,
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
    )
    tower = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
    )
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            max_position_embeddings=max_position_embeddings,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            **tower,
        ),
        vision_config=dict(image_size=image_size, patch_size=patch_size, **tower),
        projection_dim=projection_dim,
    )
    return CLIPModel(config), processor


def build_demo_clip(dataset: datasets.Dataset, caption_column: str = "captions") -> tuple[CLIPModel, CLIPProcessor]:
    """The demo's small CLIP (32 px images, 2 layers of width 64) with a word vocabulary taken from `dataset`.

    The tokenizer depends only on the dataset's words, so every process (and every benchmark cell) that builds it
    from the same dataset gets the same token ids.
    """
    tokenizer = build_word_tokenizer(caption_vocabulary(dataset, caption_column, extra_text="a photo of a"))
    return build_clip(tokenizer, image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2)
