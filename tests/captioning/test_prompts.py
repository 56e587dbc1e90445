import pytest

from mmft_hf.captioning.prompts import (
    CAPTION_TYPES,
    DOMAINS,
    build_prompt,
    normalize_class_name,
    validate_caption_types,
    validate_template,
)


def test_default_prompt_is_the_paper_text():
    prompt = build_prompt("banded", "textures", "shape")
    assert prompt == (
        "To differentiate this banded photo from other textures photos, describe its primary shape "
        "characteristics based on the photo in 50 words."
    )
    assert CAPTION_TYPES == ("visual", "shape", "texture")


@pytest.mark.parametrize("characteristic", [*CAPTION_TYPES, "petals", "color", "symbols", "spatial", "context"])
def test_prompt_contains_class_domain_and_characteristic(characteristic):
    prompt = build_prompt("black footed albatross", DOMAINS["cub200"], characteristic, words=30)
    assert "this black footed albatross photo" in prompt
    assert "other birds photos" in prompt
    assert f"primary {characteristic} characteristics" in prompt
    assert "in 30 words" in prompt


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("001.Black_footed_Albatross", "black footed albatross"),
        ("Abyssinian", "abyssinian"),
        ("great_pyrenees", "great pyrenees"),
        ("Speed-Limit  20", "speed limit 20"),
        ("  red and white circle 20 kph speed limit ", "red and white circle 20 kph speed limit"),
        ("2.5 ton truck", "2.5 ton truck"),  # a decimal number is not a CUB prefix
        ("200.Common_Yellowthroat", "common yellowthroat"),
        ("AnnualCrop", "annualcrop"),
        ("a__b--c", "a b c"),
    ],
)
def test_normalize_class_name(raw, expected):
    assert normalize_class_name(raw) == expected


def test_normalize_rejects_empty_and_non_strings():
    with pytest.raises(ValueError, match="empty"):
        normalize_class_name("001.")
    with pytest.raises(TypeError):
        normalize_class_name(3)


def test_domains_cover_the_13_benchmarks():
    assert len(DOMAINS) == 13
    assert (
        DOMAINS["dtd"] == "textures" and DOMAINS["eurosat"] == "satellite" and DOMAINS["fgvc_aircraft"] == "aircrafts"
    )
    assert sum(domain == "general objects" for domain in DOMAINS.values()) == 4


def test_custom_template():
    template = "Describe the {characteristic} of this {class_name} ({domain}), {{briefly}}."
    assert build_prompt("tabby cat", "pets", "fur", template=template) == (
        "Describe the fur of this tabby cat (pets), {briefly}."
    )
    assert build_prompt("x", "pets", "visual", template="What is this {class_name}?") == "What is this x?"


@pytest.mark.parametrize(
    "template, message",
    [
        ("Describe this {domain} photo.", "class_name"),
        ("Describe {class_name} {colour}.", "unknown field"),
        ("Describe {class_name} {}.", "unknown field"),
        ("Describe {class_name", "not a valid format"),
        ("", "non-empty"),
    ],
)
def test_bad_templates(template, message):
    with pytest.raises(ValueError, match=message):
        validate_template(template)


def test_bad_arguments():
    with pytest.raises(ValueError, match="words"):
        build_prompt("cat", "pets", "visual", words=0)
    with pytest.raises(ValueError, match="domain"):
        build_prompt("cat", " ", "visual")
    with pytest.raises(ValueError, match="duplicates"):
        validate_caption_types(["shape", "shape"])
    with pytest.raises(ValueError, match="at least one"):
        validate_caption_types([])
    assert validate_caption_types("shape") == ("shape",)


def test_long_caption_type_asks_for_a_detailed_caption_of_its_own_length():
    from mmft_hf.captioning.prompts import CAPTION_WORDS, LONG_CAPTION_TYPE, requested_words

    assert LONG_CAPTION_TYPE == "long" and CAPTION_WORDS == {"long": 150}
    prompt = build_prompt("banded", "textures", "long")
    assert "this banded photo from other textures photos" in prompt and "in detail" in prompt
    assert "in about 150 words." in prompt and "primary long characteristics" not in prompt
    assert build_prompt("banded", "textures", "long", words=20) == prompt  # the run's words are for short types
    assert requested_words("long", 20) == 150 and requested_words("shape", 20) == 20
    assert build_prompt("banded", "textures", "shape", words=20).endswith("in 20 words.")  # unchanged
    custom = "Describe the {class_name} ({characteristic}) in {words} words."
    assert build_prompt("banded", "textures", "long", template=custom) == "Describe the banded (long) in 150 words."


def test_long_caption_type_flows_through_the_cost_estimate(tmp_path):
    """The estimate captions its sample with the run's caption types: the `long` type is requested with its own
    prompt (150 words), and its tokens are counted; the loopback server echoes each prompt and counts words."""
    import datasets
    from PIL import Image

    from mmft_hf.captioning.captioners.openai_compatible import OpenAICompatibleCaptioner
    from mmft_hf.captioning.stats import estimate_captioning_cost
    from tests.fake_batch_api import fake_usage, prompt_of, start_fake_batch_api

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    images = [Image.new("RGB", (64 + i, 48), (30 * i, 90, 160)) for i in range(4)]
    dataset = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0, 1]}, features=features)
    server = start_fake_batch_api()
    try:
        captioner = OpenAICompatibleCaptioner("fake-vlm", base_url=server.base_url, api_key_env=None)
        estimates = {}
        for kinds in (("visual", "shape"), ("visual", "long")):
            first = len(server.requests)
            estimates[kinds] = estimate_captioning_cost(
                dataset, captioner, domain="pets", sample_rows=4, caption_types=kinds, cache_dir=tmp_path / kinds[1]
            )
            bodies = [body for _, _, body in server.requests[first:]]
            usages = [fake_usage(body, prompt_of(body)) for body in bodies]  # what the server reported
            assert estimates[kinds].requests == len(bodies) == 8
            assert estimates[kinds].input_tokens == sum(usage["prompt_tokens"] for usage in usages)
            assert estimates[kinds].output_tokens == sum(usage["completion_tokens"] for usage in usages)
    finally:
        server.shutdown()
        server.server_close()
    assert sum("in about 150 words" in prompt_of(body) for _, _, body in server.requests) == 4
    assert estimates[("visual", "long")].output_tokens > estimates[("visual", "shape")].output_tokens
