"""`mmft-hf caption` at scale: --captioner openai-batch:, --one_request_per_image, --estimate_only,
--export_requests and --import_results, end to end against the loopback Batch API."""

import json

import datasets
import pytest
from transformers import HfArgumentParser

from mmft_hf.captioning.stats import CostEstimate
from mmft_hf.commands import caption as caption_command
from tests.fake_batch_api import run_engine, start_fake_batch_api


@pytest.fixture
def server():
    server = start_fake_batch_api()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def source_dir(image_files_dataset, tmp_path):
    image_files_dataset.remove_columns("captions").save_to_disk(str(tmp_path / "src"))
    return str(tmp_path / "src")


def argv(source_dir, server, cache_dir, captioner="openai:fake-vlm", *extra):
    return [
        "--dataset_name", source_dir, "--domain", "textures", "--captioner", captioner, "--base_url", server.base_url,
        "--api_key_env", "none", "--cache_dir", str(cache_dir), "--poll_interval_s", "0.01", *extra,
    ]  # fmt: skip


def test_batch_captioner_flags_reach_the_captioner():
    parser = HfArgumentParser(caption_command.CaptioningArguments)
    args = parser.parse_args_into_dataclasses(
        args=["--captioner", "openai-batch:m", "--max_requests_per_batch", "7", "--batch_retry", "sync"]
    )[0]
    kwargs = caption_command.captioner_kwargs(args, "openai-batch:m")
    assert kwargs["max_requests_per_batch"] == 7 and kwargs["retry_failed"] == "sync"
    assert kwargs["completion_window"] == "24h" and kwargs["api_key_env"] == "OPENAI_API_KEY"
    assert "retry_failed" not in caption_command.captioner_kwargs(
        parser.parse_args_into_dataclasses(args=["--captioner", "openai:m"])[0], "openai:m"
    )


def test_estimate_then_joint_batch_run(server, source_dir, tmp_path):
    estimate = caption_command.main(
        argv(source_dir, server, tmp_path / "cache", "openai-batch:fake-vlm", "--estimate_only",
             "--estimate_sample_rows", "3", "--price_per_million_input_tokens", "1")
    )["train"]  # fmt: skip
    assert isinstance(estimate, CostEstimate) and estimate.requests == 36
    assert len(server.requests) == 9 and server.created == []  # the sample went synchronously
    summary = caption_command.main(
        argv(source_dir, server, tmp_path / "cache", "openai-batch:fake-vlm", "--one_request_per_image",
             "--output_dir", str(tmp_path / "out"))
    )["train"]  # fmt: skip
    assert summary.cache_hits == 9 and summary.requests == 9 and summary.failures == []  # 9 images left, 1 each
    assert len(server.created) == 1 and len(server.requests) == 9
    loaded = datasets.load_dataset(str(tmp_path / "out"), cache_dir=str(tmp_path / "hf"))["train"]
    assert all(len(row) == 3 for row in loaded["captions"])


def test_export_engine_import_then_write(server, source_dir, tmp_path):
    summary = caption_command.main(
        argv(source_dir, server, tmp_path / "cache", "openai:fake-vlm", "--export_requests",
             str(tmp_path / "requests.jsonl"))
    )["train"]  # fmt: skip
    assert summary.requests == 36 and server.requests == []
    assert len(open(tmp_path / "requests.jsonl").readlines()) == 36
    run_engine(tmp_path / "requests.jsonl", tmp_path / "results.jsonl")
    result = caption_command.main(
        argv(source_dir, server, tmp_path / "cache", "openai:fake-vlm", "--import_results",
             str(tmp_path / "results.jsonl"), "--output_dir", str(tmp_path / "out"))
    )["train"]  # fmt: skip
    assert result.requests == 0 and result.cache_hits == 36 and server.requests == []
    loaded = datasets.load_dataset(str(tmp_path / "out"), cache_dir=str(tmp_path / "hf"))["train"]
    assert sum(len(row) for row in loaded["captions"]) == 36
    assert json.loads(loaded.features["captions"].feature.id)["captioner"]["model"] == "fake-vlm"


def test_builder_with_a_batch_spec_and_one_request_per_image(server, image_files_dataset, tmp_path):
    from mmft_hf import CaptionedImages

    ds = image_files_dataset.remove_columns("captions")
    builder = CaptionedImages(
        source=datasets.DatasetDict({"train": ds.select(range(8)), "test": ds.select(range(8, 12))}),
        domain="textures",
        captioner="openai-batch:fake-vlm",
        captioner_kwargs={"base_url": server.base_url, "api_key_env": None, "poll_interval_s": 0.01},
        one_request_per_image=True,
        dataset_name="captioned_batch",
        cache_dir=str(tmp_path / "hf"),
        caption_cache_dir=str(tmp_path / "captions"),
    )
    builder.download_and_prepare()
    dataset = builder.as_dataset()
    assert len(server.created) == 2 and len(server.processed) == 12 and server.requests == []  # a batch per split
    assert all(len(row) == 3 for split in dataset.values() for row in split["captions"])
