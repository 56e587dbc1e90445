"""WiSE-FT weight interpolation against state-dict arithmetic, its edges, and LoRA (scaled adapter = interpolated
merged weights)."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from mmft_hf import wise_ft
from mmft_hf.synthetic import build_clip
from mmft_hf.training.wise_ft import parse_alphas


def clip(tokenizer, seed, **config):
    torch.manual_seed(seed)
    model, _ = build_clip(tokenizer, **config)
    with torch.no_grad():  # distinct temperatures, so the test sees logit_scale being mixed
        model.logit_scale.fill_(1.0 + seed)
    return model


def reference_mix(start: dict, finetuned: dict, alpha: float) -> dict:
    """Independent reference: float64 state-dict arithmetic; non-float entries from the fine-tuned model."""
    return {
        key: ((1 - alpha) * start[key].double() + alpha * value.double()).to(value.dtype)
        if value.is_floating_point()
        else value.clone()
        for key, value in finetuned.items()
    }


def snapshot(model) -> dict:
    return {key: value.clone() for key, value in model.state_dict().items()}


@pytest.mark.parametrize("alpha", [0.3, 0.75])
def test_every_weight_is_the_convex_mix(tiny_tokenizer, alpha):
    start, finetuned = clip(tiny_tokenizer, 0), clip(tiny_tokenizer, 1)
    before_start, before_finetuned = snapshot(start), snapshot(finetuned)
    mixed = wise_ft(start, finetuned, alpha)

    assert type(mixed) is type(finetuned) and mixed is not finetuned
    expected = reference_mix(before_start, before_finetuned, alpha)
    state = mixed.state_dict()
    assert state.keys() == expected.keys()
    for key, value in state.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)
    # both towers, the projections and the temperature moved; integer buffers were copied
    for name in ("text_model.encoder.layers.0.mlp.fc1.weight", "vision_model.embeddings.patch_embedding.weight",
                 "visual_projection.weight", "text_projection.weight"):  # fmt: skip
        assert not torch.equal(state[name], before_start[name]) and not torch.equal(
            state[name], before_finetuned[name]
        )
    assert mixed.logit_scale.item() == pytest.approx((1 - alpha) * 1.0 + alpha * 2.0)
    integer_buffers = {k: v for k, v in finetuned.named_buffers() if not v.is_floating_point()}
    assert integer_buffers  # position_ids (not in the state dict under transformers 5: copied with the model)
    mixed_buffers = dict(mixed.named_buffers())
    assert all(torch.equal(mixed_buffers[key], value) for key, value in integer_buffers.items())
    # the inputs are untouched
    for model, saved in ((start, before_start), (finetuned, before_finetuned)):
        assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())


def test_alpha_zero_and_one_reproduce_the_models_exactly(tiny_tokenizer):
    start, finetuned = clip(tiny_tokenizer, 0), clip(tiny_tokenizer, 1)
    for alpha, source in ((0.0, start), (1.0, finetuned)):
        mixed = wise_ft(start, finetuned, alpha).state_dict()
        for key, value in source.state_dict().items():
            assert torch.equal(mixed[key], value), (alpha, key)


def test_half_precision_weights_are_mixed_in_float32_and_kept_in_their_dtype(tiny_tokenizer):
    start, finetuned = clip(tiny_tokenizer, 0).to(torch.bfloat16), clip(tiny_tokenizer, 1).to(torch.bfloat16)
    mixed = wise_ft(start, finetuned, 0.5)
    expected = reference_mix(start.state_dict(), finetuned.state_dict(), 0.5)
    for key, value in mixed.state_dict().items():
        assert value.dtype == expected[key].dtype
        torch.testing.assert_close(value, expected[key], msg=key)


def test_mismatched_models_and_alphas_are_refused(tiny_tokenizer):
    start = clip(tiny_tokenizer, 0)
    wider = clip(tiny_tokenizer, 1, hidden_size=48)
    with pytest.raises(ValueError, match=r"architectures differ.*shapes differ \(\d+\): .*\.weight: \(\d+, \d+\) vs"):
        wise_ft(start, wider, 0.5)
    deeper = clip(tiny_tokenizer, 1, num_hidden_layers=3)
    with pytest.raises(ValueError, match="only in the fine-tuned model.*layers.2"):
        wise_ft(start, deeper, 0.5)
    with pytest.raises(ValueError, match="one architecture.*CLIPModel.*CLIPTextModel"):
        wise_ft(start, start.text_model.__class__(start.config.text_config), 0.5)
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
            wise_ft(start, clip(tiny_tokenizer, 1), alpha)


def lora_run(start, seed=0, target_modules=("q_proj", "v_proj")):
    """A peft model as MMFTTrainer's LoRA run leaves it: trained adapters and a trained (unfrozen) temperature."""
    config = LoraConfig(r=2, lora_alpha=4, target_modules=list(target_modules))
    model = get_peft_model(copy.deepcopy(start), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        model.get_base_model().logit_scale.fill_(3.0)
    return model


@pytest.mark.parametrize(
    "alpha, target_modules",
    [(0.0, ("q_proj", "v_proj")), (0.4, ("q_proj", "v_proj")), (1.0, ("q_proj", "v_proj")),
     (0.4, ("q_proj", "token_embedding"))],  # an embedding's adapter factors are bare parameters
)  # fmt: skip
def test_lora_alpha_scales_the_update_like_interpolating_merged_weights(tiny_tokenizer, alpha, target_modules):
    start = clip(tiny_tokenizer, 0)
    finetuned = lora_run(start, target_modules=target_modules)
    before = snapshot(finetuned)
    mixed = wise_ft(start, finetuned, alpha)

    assert type(mixed) is type(finetuned)  # a PeftModel: the adapter is scaled, not merged
    merged_reference = reference_mix(
        start.state_dict(), copy.deepcopy(finetuned).merge_and_unload().state_dict(), alpha
    )
    merged = mixed.merge_and_unload().state_dict()
    assert merged.keys() == merged_reference.keys()
    for key, value in merged.items():
        torch.testing.assert_close(value, merged_reference[key], rtol=0, atol=1e-6, msg=key)
    assert all(torch.equal(value, before[key]) for key, value in finetuned.state_dict().items())


def test_lora_adapter_factors_b_are_scaled(tiny_tokenizer):
    start = clip(tiny_tokenizer, 0)
    finetuned = lora_run(start)
    state = wise_ft(start, finetuned, 0.25).state_dict()
    for key, value in finetuned.state_dict().items():
        if "lora_B" in key:
            torch.testing.assert_close(state[key], 0.25 * value)
        elif "lora_A" in key:
            assert torch.equal(state[key], value)
    with pytest.raises(ValueError, match="start_model is a peft model"):
        wise_ft(finetuned, finetuned, 0.5)


def test_parse_alphas():
    assert parse_alphas("0, 0.25,0.5,0.75,1") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_alphas("0.5") == [0.5]
    for text, message in (("", "names no value"), ("0,x", "'x' is not a number"), ("1.2", "outside"),
                          ("0.5,0.5", "given twice")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            parse_alphas(text)
