"""TransformersCaptioner on a tiny random LLaVA saved to disk: batching, greedy equivalence, seeding, clean-up."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_vlm import save_tiny_vlm

from mmft_hf.captioning.captioners import CaptionRequest, CaptionResult, TransformersCaptioner
from mmft_hf.captioning.captioners.images import prepare_image, strip_thinking


@pytest.fixture(scope="module")
def tiny_vlm_dir(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"))


def make_requests(count):
    # Different sizes, modes and prompt lengths, so left padding really varies inside a batch.
    modes = ["RGB", "L", "RGBA"]
    return [
        CaptionRequest(
            image=Image.new("RGB", (20 + 7 * i, 30 + 3 * i), (40 * i % 256, 90, 200 - 20 * i)).convert(modes[i % 3]),
            prompt="Describe the texture " + "in detail " * i,
        )
        for i in range(count)
    ]


def run(captioner, requests):
    return dict(captioner.caption(requests))


def test_batches_cover_every_request(tiny_vlm_dir):
    captioner = TransformersCaptioner(tiny_vlm_dir, batch_size=2, max_new_tokens=6, device="cpu", seed=3)
    requests = make_requests(5)
    seen = []
    for index, result in captioner.caption(requests):
        seen.append(index)
        assert isinstance(result, CaptionResult) and result.error is None
        assert isinstance(result.text, str) and result.text == result.text.strip()
        assert result.usage["prompt_tokens"] > 0 and 0 <= result.usage["completion_tokens"] <= 6
        # an answer shorter than max_new_tokens ended by itself; "length" only for one cut at 6 tokens
        assert result.finish_reason == "stop" or result.usage["completion_tokens"] == 6
    assert sorted(seen) == [0, 1, 2, 3, 4] and len(seen) == 5


def test_greedy_batched_equals_one_at_a_time(tiny_vlm_dir):
    batched = TransformersCaptioner(tiny_vlm_dir, batch_size=4, max_new_tokens=8, do_sample=False, device="cpu")
    single = TransformersCaptioner(tiny_vlm_dir, batch_size=1, max_new_tokens=8, do_sample=False, device="cpu")
    requests = make_requests(5)
    batched_out, single_out = run(batched, requests), run(single, requests)
    assert [batched_out[i].text for i in range(5)] == [single_out[i].text for i in range(5)]
    # Prompt token counts ignore padding, so they match one-at-a-time counts too.
    assert [batched_out[i].usage for i in range(5)] == [single_out[i].usage for i in range(5)]
    # The prompts differ in length, so the batch really was padded.
    assert len({r.usage["prompt_tokens"] for r in batched_out.values()}) == 5


def test_sampling_is_seeded_and_leaves_global_rng_alone(tiny_vlm_dir):
    requests = make_requests(4)
    kwargs = dict(batch_size=2, max_new_tokens=12, do_sample=True, temperature=5.0, device="cpu")
    first = TransformersCaptioner(tiny_vlm_dir, seed=1, **kwargs)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    out_a = run(first, requests)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    out_b = run(first, requests)
    assert {i: r.text for i, r in out_a.items()} == {i: r.text for i, r in out_b.items()}
    other = TransformersCaptioner(tiny_vlm_dir, seed=2, **kwargs)
    out_c = run(other, requests)
    # At temperature 5 over 260 tokens, 4 x 12 draws repeating exactly under another seed is impossible in practice.
    assert [out_a[i].usage for i in range(4)] != [out_c[i].usage for i in range(4)] or [
        out_a[i].text for i in range(4)
    ] != [out_c[i].text for i in range(4)]
    assert first.cache_identity() != other.cache_identity()


def test_cache_identity_and_thinking_switch(tiny_vlm_dir):
    captioner = TransformersCaptioner(tiny_vlm_dir, batch_size=3, do_sample=False, device="cpu")
    identity = captioner.cache_identity()
    assert identity["backend"] == "transformers" and identity["model"] == tiny_vlm_dir
    assert identity["dtype"] == "float32" and identity["do_sample"] is False and identity["temperature"] is None
    assert "batch_size" not in identity
    assert captioner._template_kwargs == {}  # the tiny template has no enable_thinking switch
    captioner_bf16 = TransformersCaptioner(tiny_vlm_dir, do_sample=False, device="cpu", torch_dtype="bfloat16")
    assert captioner_bf16.cache_identity()["dtype"] == "bfloat16"
    assert len(run(captioner_bf16, make_requests(2))) == 2
    with pytest.raises(ValueError, match="torch_dtype"):
        TransformersCaptioner(tiny_vlm_dir, torch_dtype="float17")


def test_enable_thinking_passed_only_when_the_template_reads_it(tiny_vlm_dir, tmp_path):
    thinking_dir = tmp_path / "thinking-vlm"
    shutil.copytree(tiny_vlm_dir, thinking_dir)
    template_file = thinking_dir / "chat_template.jinja"
    switch = "{% if enable_thinking is defined and not enable_thinking %}NOTHINK {% endif %}"
    template_file.write_text(switch + template_file.read_text())
    for directory, expected in ((tiny_vlm_dir, False), (thinking_dir, True)):
        captioner = TransformersCaptioner(directory, batch_size=2, max_new_tokens=4, do_sample=False, device="cpu")
        prompts_seen = []
        generate = captioner.model.generate

        def recording_generate(generate=generate, decode=captioner.processor.batch_decode, seen=prompts_seen, **batch):
            seen.extend(decode(batch["input_ids"], skip_special_tokens=True))
            return generate(**batch)

        captioner.model.generate = recording_generate
        assert len(run(captioner, make_requests(3))) == 3
        assert len(prompts_seen) == 3
        assert all(("NOTHINK" in prompt) == expected for prompt in prompts_seen)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  a red cat  ", "a red cat"),
        ("<think>hmm, fur?</think>\nA red cat.", "A red cat."),
        ("<THINK>x</THINK>A<think>y</think> cat", "A cat"),
        ("<think>\nmulti\nline\n</think>\n\nDone.", "Done."),
        ("<think>never closed, cut off by max_tokens", ""),
        ("reasoning that began in the prompt</think> The caption.", "The caption."),
        ("<think></think>", ""),
        ("no tags at all", "no tags at all"),
    ],
)
def test_strip_thinking(raw, clean):
    assert strip_thinking(raw) == clean


def test_prepare_image_modes_and_bounds():
    rgba = Image.new("RGBA", (1000, 500), (255, 0, 0, 0))  # fully transparent red
    out = prepare_image(rgba, 768)
    assert out.mode == "RGB" and out.size == (768, 384)
    assert out.getpixel((10, 10)) == (255, 255, 255)  # composited on white, not black
    assert prepare_image(Image.new("L", (300, 900), 7), 768).size == (256, 768)
    assert prepare_image(Image.new("CMYK", (10, 20)), 768).mode == "RGB"
    small = Image.new("RGB", (50, 40))
    assert prepare_image(small, 768).size == (50, 40)  # never upscaled
    assert prepare_image(Image.new("RGB", (2000, 3)), 100).size == (100, 1)  # thin images keep >= 1 px
    with pytest.raises(TypeError, match="PIL"):
        prepare_image("cat.jpg", 768)


def test_prepare_image_rescales_16_bit_images():
    # a 16-bit scan at a quarter and at three quarters of the range: PIL's own conversion clips both to white
    deep = Image.fromarray(np.array([[16384, 49152]], dtype=np.uint16))
    out = prepare_image(deep, 768)
    assert out.mode == "RGB" and [out.getpixel((x, 0)) for x in range(2)] == [(64, 64, 64), (191, 191, 191)]
    assert deep.mode == "I;16" and deep.getpixel((0, 0)) == 16384  # the caller's image is untouched


def test_answers_cut_by_max_new_tokens_never_become_captions(tiny_vlm_dir, tmp_path):
    import datasets

    from mmft_hf.captioning.caption import caption_dataset

    # a random tiny model almost never ends within 2 tokens: its answers are cut ("length"), so the quality gate
    # refuses them; each is counted by reason, asked again in the next pass, and nothing reaches the cache
    captioner = TransformersCaptioner(tiny_vlm_dir, batch_size=4, max_new_tokens=2, do_sample=False, device="cpu")
    results = dict(captioner.caption(make_requests(4)))
    cut = sum(result.finish_reason == "length" for result in results.values())
    assert cut >= 1
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.Dataset.from_dict(
        {"image": [r.image.convert("RGB") for r in make_requests(4)], "label": [0, 1, 0, 1]}, features=features
    )
    result = caption_dataset(
        ds, captioner, domain="textures", caption_types=("visual",), cache_dir=tmp_path, max_passes=2,
        show_progress=False, allow_missing=True, retry_resize=None,
    )  # fmt: skip
    summary = result.caption_summary
    stored = sum(len(row) for row in result["captions"])
    assert summary.rejected.get("finish_reason=length", 0) >= 1 and stored <= 4 - 1
    assert all("finish_reason=length" in failure.reason for failure in summary.failures)
    assert summary.requests == 4 + len(summary.failures)  # a rejected answer is asked again in the next pass


def test_a_request_may_raise_the_token_limit(tiny_vlm_dir):
    # the engine raises the limit of a request whose answer was cut (CaptionRequest.max_tokens); requests with
    # different limits in one batch are generated apart, each as a captioner configured with that limit would
    captioner = TransformersCaptioner(tiny_vlm_dir, batch_size=4, max_new_tokens=2, do_sample=False, device="cpu")
    assert captioner.max_tokens == 2
    requests = make_requests(4)
    requests[1].max_tokens = requests[3].max_tokens = 8
    results = run(captioner, requests)
    assert [results[i].max_tokens for i in range(4)] == [2, 8, 2, 8]
    assert all(results[i].usage["completion_tokens"] <= 2 for i in (0, 2))
    assert max(results[i].usage["completion_tokens"] for i in (1, 3)) > 2  # past the configured limit
    wider = TransformersCaptioner(tiny_vlm_dir, batch_size=4, max_new_tokens=8, do_sample=False, device="cpu")
    reference = run(wider, [requests[1], requests[3]])
    assert [results[1].text, results[3].text] == [reference[0].text, reference[1].text]
    assert [results[1].finish_reason, results[3].finish_reason] == [
        reference[0].finish_reason,
        reference[1].finish_reason,
    ]
