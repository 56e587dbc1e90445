"""Tiny dual encoders of every family transformers has, built offline from configs, each with its processor.

Every builder takes the words the texts use and returns `(model, processor)`. The tokenizers are `tokenizers`
models wrapped in `PreTrainedTokenizerFast` (SigLIP's own tokenizers need sentencepiece and a download).
"""

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import (
    BertConfig,
    ConvNextConfig,
    PreTrainedTokenizerFast,
    Siglip2Config,
    Siglip2ImageProcessorPil,
    Siglip2Model,
    Siglip2Processor,
    Siglip2Tokenizer,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipProcessor,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
    VisionTextDualEncoderProcessor,
    ViTImageProcessorPil,
)

from mmft_hf.synthetic import build_clip, build_word_tokenizer

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
SIGLIP_TEXT_LENGTH = 32  # SigLIP pads every text to its context length (64 for the released checkpoints)


def word_level_tokenizer(words, specials, template, model_max_length, **special_tokens) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over `specials + words`, with `template` as its post-processor."""
    vocab = {token: index for index, token in enumerate([*specials, *sorted(set(words))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>" if "<unk>" in vocab else "[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # words and punctuation
    backend.post_processor = TemplateProcessing(
        single=template, special_tokens=[(token, vocab[token]) for token in specials if token in template]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=model_max_length, **special_tokens)


def siglip_tokenizer(words) -> PreTrainedTokenizerFast:
    """Like SigLIP's: `</s>` appended, `<pad>` id 0, `</s>` id 1; the model pools the last position."""
    return word_level_tokenizer(
        [*words, "."],
        ["<pad>", "</s>", "<unk>"],
        "$A </s>",
        SIGLIP_TEXT_LENGTH,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def siglip_text_config(tokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=SIGLIP_TEXT_LENGTH,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
        **TOWER,
    )


def build_tiny_clip(words):
    return build_clip(build_word_tokenizer(words))


def build_tiny_siglip(words):
    tokenizer = siglip_tokenizer(words)
    config = SiglipConfig(
        text_config=siglip_text_config(tokenizer), vision_config=dict(image_size=32, patch_size=8, **TOWER)
    )
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    return SiglipModel(config), SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def learn_merges(pieces) -> list[tuple[str, str]]:
    """Deterministic BPE: merge the most frequent adjacent pair (ties: smallest) until each piece is one symbol."""
    segmented = [list(piece) for piece in sorted(set(pieces))]
    merges = []
    while True:
        counts = {}
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


def siglip2_tokenizer(words) -> Siglip2Tokenizer:
    """SigLIP 2's own tokenizer class (Gemma BPE, spaces as "▁", lower-cased), with whole words as tokens.

    `AutoTokenizer` loads a SigLIP 2 checkpoint's `tokenizer.json` into `Siglip2Tokenizer` whatever it holds, so
    the tiny tokenizer must be one for the saved classifier to tokenize as in training.
    """
    pieces = [piece for word in [*words, "."] for piece in (word, word + "▁")]
    characters = sorted({character for piece in pieces for character in piece})
    vocab = {token: index for index, token in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *characters])}
    merges = learn_merges(pieces)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return Siglip2Tokenizer(vocab=vocab, merges=merges, model_max_length=SIGLIP_TEXT_LENGTH)


def build_tiny_siglip2(words):
    """SigLIP 2 (NaFlex): the image processor cuts images into at most 16 patches of 8x8 at their aspect ratio and
    also returns `pixel_attention_mask` and `spatial_shapes`, which the image tower needs."""
    tokenizer = siglip2_tokenizer(words)
    config = Siglip2Config(
        text_config=siglip_text_config(tokenizer), vision_config=dict(num_patches=16, patch_size=8, **TOWER)
    )
    image_processor = Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16)
    return Siglip2Model(config), Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer)


def build_tiny_cnn_dual_encoder(words):
    """`VisionTextDualEncoderModel` with a ConvNeXt image tower (pooled: the layer-normed global average of the
    last feature map, `[batch, channels]`, not a ViT's class token) and a BERT text tower.

    `VisionTextDualEncoderModel` sizes its image projection from `vision_config.hidden_size`, which CNN configs do
    not have: it is set to the pooled width (`hidden_sizes[-1]`) here. A ResNet tower cannot be used (its pooled
    output is `[batch, channels, 1, 1]`, which the projection does not accept), and a randomly initialised tiny
    EfficientNet outputs all zeros in transformers 5.23, so it would test nothing.
    """
    tokenizer = word_level_tokenizer(
        [*words, "."],
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
        "[CLS] $A [SEP]",
        32,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    vision = ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], hidden_size=32)
    text = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=32, **TOWER)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=16)
    image_processor = ViTImageProcessorPil(size={"height": 32, "width": 32})
    processor = VisionTextDualEncoderProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return VisionTextDualEncoderModel(config), processor


BUILDERS = {
    "clip": build_tiny_clip,
    "siglip": build_tiny_siglip,
    "siglip2": build_tiny_siglip2,
    "cnn-dual-encoder": build_tiny_cnn_dual_encoder,
}


def build(family: str, words, seed: int = 0):
    torch.manual_seed(seed)
    return BUILDERS[family](words)
