"""`max_text_length`: one limit for the collator, the class prototypes and the caption statistics."""

import pytest
from transformers import CLIPConfig, SiglipConfig, VisionTextDualEncoderConfig

from mmft_hf.encoders import CLIP_CONTEXT_LENGTH, max_text_length
from mmft_hf.synthetic import build_word_tokenizer

UNBOUNDED = int(1e30)  # what transformers reports for a tokenizer without a limit (SigLIP 2's Gemma tokenizer)


def tokenizer_allowing(tokens: int):
    tokenizer = build_word_tokenizer(["red"])
    tokenizer.model_max_length = tokens
    return tokenizer


def siglip_config(positions: int) -> SiglipConfig:
    return SiglipConfig(text_config={"max_position_embeddings": positions})


@pytest.mark.parametrize(
    "tokens, config, expected",
    [
        (77, siglip_config(64), 64),  # the SigLIP case of issue 15: the text tower is the bound
        (UNBOUNDED, siglip_config(64), 64),  # a tokenizer without a limit leaves the model's
        (16, siglip_config(64), 16),  # a tokenizer that cuts shorter than the model
        (77, CLIPConfig(text_config={"max_position_embeddings": 77}), 77),
        (
            512,
            VisionTextDualEncoderConfig(
                vision_config=CLIPConfig().vision_config.to_dict() | {"model_type": "clip_vision_model"},
                text_config={"model_type": "bert", "max_position_embeddings": 32},
            ),
            32,
        ),  # fmt: skip
        (77, None, 77),  # only a tokenizer: its limit, at most CLIP's 77
        (UNBOUNDED, None, CLIP_CONTEXT_LENGTH),
        (16, None, 16),
    ],
    ids=[
        "siglip-77-64",
        "unbounded-64",
        "tokenizer-16",
        "clip",
        "vision-text-dual-encoder",
        "no-model-77",
        "no-model-unbounded",
        "no-model-16",
    ],  # fmt: skip
)
def test_the_smallest_known_limit_wins(tokens, config, expected):
    assert max_text_length(config, tokenizer_allowing(tokens)) == expected


def test_a_model_is_read_through_its_config():
    from transformers import SiglipModel

    tiny = SiglipConfig(
        text_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=64, vocab_size=300),
        vision_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
    )  # fmt: skip
    assert max_text_length(SiglipModel(tiny), tokenizer_allowing(77)) == 64


def test_no_usable_limit_is_a_clear_error():
    class Config:  # a text config without max_position_embeddings
        pass

    tokenizer = tokenizer_allowing(77)
    tokenizer.model_max_length = None
    with pytest.raises(ValueError, match="model_max_length is None .* Set tokenizer.model_max_length"):
        max_text_length(Config(), tokenizer)
