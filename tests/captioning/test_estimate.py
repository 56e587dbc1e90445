"""`estimate_captioning_cost`: a cached stratified sample, extrapolated; checked against the full run's usage."""

import datasets
import pytest
from PIL import Image

from mmft_hf import OpenAIBatchCaptioner, caption_dataset
from mmft_hf.captioning.captioners.openai_compatible import OpenAICompatibleCaptioner
from mmft_hf.captioning.stats import estimate_captioning_cost, stratified_sample
from tests.fake_batch_api import start_fake_batch_api


@pytest.fixture
def server():
    server = start_fake_batch_api()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def varied():
    """30 rows, 3 classes with names of different lengths, images from 1 to 4 tiles (the server counts tiles)."""
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "striped_sea_bass", "oak_tree"])}
    )
    sides = [(200 + 37 * (i % 11), 150 + 53 * (i % 7)) for i in range(30)]
    images = [Image.new("RGB", side, (8 * i, 90, 160)) for i, side in enumerate(sides)]
    return datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(30)]}, features=features)


def total_tokens(usage):
    return usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize("joint", [False, True])
def test_estimate_is_within_15_percent_of_the_full_run(server, varied, tmp_path, joint):
    captioner = OpenAICompatibleCaptioner("fake-vlm", base_url=server.base_url, api_key_env=None)
    estimate = estimate_captioning_cost(
        varied, captioner, domain="nature", sample_rows=6, cache_dir=tmp_path / "a", one_request_per_image=joint,
        price_per_million_input_tokens=0.1, price_per_million_output_tokens=0.4,
    )  # fmt: skip
    assert len(server.requests) == estimate.sample_requests == (6 if joint else 18)
    assert estimate.requests == (30 if joint else 90)
    full = caption_dataset(
        varied, captioner, domain="nature", cache_dir=tmp_path / "b", one_request_per_image=joint, show_progress=False
    )
    measured = total_tokens(full.caption_summary.usage)
    assert abs(estimate.input_tokens + estimate.output_tokens - measured) <= 0.15 * measured
    assert estimate.modes["synchronous"]["cost"] == pytest.approx(
        (estimate.input_tokens * 0.1 + estimate.output_tokens * 0.4) / 1e6
    )
    assert estimate.modes["batch"]["cost"] == pytest.approx(0.5 * estimate.modes["synchronous"]["cost"])
    assert estimate.modes["synchronous"]["wall_time_s"] > 0 and "requests" in str(estimate)


def test_sample_is_cached_and_reused(server, varied, tmp_path):
    captioner = OpenAICompatibleCaptioner("fake-vlm", base_url=server.base_url, api_key_env=None)
    first = estimate_captioning_cost(varied, captioner, domain="nature", sample_rows=6, cache_dir=tmp_path)
    again = estimate_captioning_cost(varied, captioner, domain="nature", sample_rows=6, cache_dir=tmp_path)
    assert again.sample_requests == 0 and again.input_tokens == first.input_tokens  # read back from the cache
    assert again.modes["synchronous"]["wall_time_s"] is None
    full = caption_dataset(varied, captioner, domain="nature", cache_dir=tmp_path, show_progress=False)
    assert full.caption_summary.requests == 90 - 18


def test_batch_captioner_sample_is_sent_synchronously(server, varied, tmp_path):
    captioner = OpenAIBatchCaptioner("fake-vlm", base_url=server.base_url, api_key_env=None, max_requests_per_batch=40)
    estimate = estimate_captioning_cost(varied, captioner, domain="nature", sample_rows=3, cache_dir=tmp_path)
    assert server.created == [] and len(server.requests) == 9
    assert estimate.modes["batch"]["batches"] == 3  # 90 requests, 40 per batch


def test_stratified_sample_spreads_over_classes(varied):
    rows = stratified_sample(varied, "label", 7, seed=1)
    labels = [varied[row]["label"] for row in rows]
    assert len(set(rows)) == 7 and sorted(labels.count(label) for label in range(3)) == [2, 2, 3]
    assert stratified_sample(varied, "label", 7, seed=1) == rows
    assert len(stratified_sample(varied, "label", 100)) == 30


def test_sample_captioned_earlier_in_the_other_mode_is_named(server, varied, tmp_path, caplog):
    captioner = OpenAICompatibleCaptioner("fake-vlm", base_url=server.base_url, api_key_env=None)
    per_type = estimate_captioning_cost(varied, captioner, domain="nature", sample_rows=3, cache_dir=tmp_path)
    assert per_type.joint_share == 0.0
    reused = estimate_captioning_cost(
        varied, captioner, domain="nature", sample_rows=3, cache_dir=tmp_path, one_request_per_image=True
    )
    assert reused.joint_share == 0.0 and reused.requests == per_type.requests  # it measured the per-type captions
    assert "the estimate measures that mode, not the one asked for" in caplog.text
    fresh = estimate_captioning_cost(
        varied, captioner, domain="nature", sample_rows=3, cache_dir=tmp_path, one_request_per_image=True, seed=1
    )
    assert fresh.joint_share == 1.0 and fresh.requests == 30


def test_classes_are_weighted_by_their_size(server, tmp_path):
    """54 rows of a cheap class, 6 of an expensive one: the even sample (3 + 3) must count each class by its size."""
    names = ["cat", "large_striped_sea_bass_with_a_long_descriptive_name"]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    labels = [0] * 54 + [1] * 6
    # within a class every request costs the same (same prompt words, same image size), across classes not
    sizes = {0: (64, 64), 1: (900, 900)}
    images = [Image.new("RGB", sizes[label], (index, 90, 160)) for index, label in enumerate(labels)]
    skewed = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    captioner = OpenAICompatibleCaptioner("fake-vlm", base_url=server.base_url, api_key_env=None)
    estimate = estimate_captioning_cost(skewed, captioner, domain="nature", sample_rows=6, cache_dir=tmp_path / "a")
    assert estimate.sample_requests == 18  # 3 rows of each class, 3 caption types
    # the reference: each class captioned in full (fresh caches), as the server reports it
    per_class = {}
    for label in (0, 1):
        rows = skewed.filter(lambda row, label=label: row["label"] == label)
        summary = caption_dataset(
            rows, captioner, domain="nature", cache_dir=tmp_path / str(label), show_progress=False
        ).caption_summary
        per_class[label] = {name: summary.usage[name] / len(rows) for name in ("prompt_tokens", "completion_tokens")}
    for name, field in (("prompt_tokens", "input_tokens"), ("completion_tokens", "output_tokens")):
        assert getattr(estimate, field) == pytest.approx(54 * per_class[0][name] + 6 * per_class[1][name])
    assert estimate.requests == pytest.approx(180)
    # scaling the same sample up without weights (each class as 30 rows) is far off: the test can tell them apart
    weighted = sum(54 * per_class[0][name] + 6 * per_class[1][name] for name in per_class[0])
    unweighted = sum(30 * per_class[0][name] + 30 * per_class[1][name] for name in per_class[0])
    assert unweighted > 1.5 * weighted


def test_a_sample_smaller_than_the_number_of_classes_still_covers_the_dataset(server, varied, tmp_path):
    captioner = OpenAICompatibleCaptioner("fake-vlm", base_url=server.base_url, api_key_env=None)
    estimate = estimate_captioning_cost(varied, captioner, domain="nature", sample_rows=2, cache_dir=tmp_path)
    assert estimate.sample_requests == 6 and estimate.requests == pytest.approx(90)
