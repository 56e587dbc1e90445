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
