"""A tiny random LLaVA (CLIP vision tower + Llama, ~61k parameters) saved like a Hub checkpoint, for captioner tests.

Byte-level tokenizer (256 byte symbols, no merges), so any prompt encodes; `<image>` is a special token expanded to
16 image tokens (4x4 patches of a 32x32 crop). Its output is random bytes: test counts and determinism, not content.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

# `trim_blocks` drops a newline right after `{% ... %}`, hence the explicit `{{ '\n' }}`.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] | upper }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def save_tiny_vlm(out_dir, seed: int = 0) -> str:
    """Builds the tiny LLaVA with random weights (seeded) and saves model + processor to `out_dir`."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    bpe = Tokenizer(models.BPE({symbol: i for i, symbol in enumerate(alphabet)}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},  # must be special, or `<` is taken as the image token
        padding_side="left",
    )
    processor = LlavaProcessor(  # (32 / 8)^2 patches; the CLS token is dropped by "default": 16 image tokens
        image_processor=LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=dict(
                model_type="clip_vision_model",
                image_size=32,
                patch_size=8,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
            ),
            text_config=dict(
                model_type="llama",
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            ),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            image_seq_length=16,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
        )
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return str(out_dir)
