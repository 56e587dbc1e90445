"""Offline engines: export requests -> a simulated `vllm run-batch` -> import -> a rerun makes zero requests."""

import json

import pytest

from mmft_hf import caption_dataset
from mmft_hf.captioning.captioners.openai_compatible import OpenAICompatibleCaptioner
from mmft_hf.captioning.offline import export_caption_requests, import_caption_results
from tests.fake_batch_api import completion, run_engine
from tests.fake_chat_server import start_fake_api

TYPES = ("visual", "shape", "texture")


@pytest.fixture
def server():
    server = start_fake_api()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def labelled(image_files_dataset):
    return image_files_dataset.remove_columns("captions")


def test_export_engine_import_then_rerun_makes_zero_requests(server, labelled, tmp_path):
    captioner = OpenAICompatibleCaptioner("fake-vlm", base_url=server.base_url, api_key_env=None)
    # a third of the captions exist already: only the rest is exported
    caption_dataset(labelled.select(range(4)), captioner, domain="textures", cache_dir=tmp_path, show_progress=False)
    paid = len(server.requests)
    exported = export_caption_requests(
        labelled, tmp_path / "requests.jsonl", captioner, domain="textures", cache_dir=tmp_path
    )
    assert len(server.requests) == paid == 12  # exporting sends nothing
    assert exported.requests == exported.captions == 24 and exported.cache_hits == 12
    lines = [json.loads(line) for line in open(tmp_path / "requests.jsonl")]
    assert len({line["custom_id"] for line in lines}) == 24
    failing = {lines[0]["custom_id"], lines[5]["custom_id"]}
    unknown = json.dumps(
        {"custom_id": "f" * 64, "response": {"status_code": 200, "body": completion(lines[1]["body"])}}
    )
    run_engine(
        tmp_path / "requests.jsonl", tmp_path / "results.jsonl", fail=failing,
        extra_lines=[unknown, "{not json", json.dumps({"custom_id": lines[2]["custom_id"]})],
    )  # fmt: skip

    report = import_caption_results(tmp_path / "results.jsonl", cache_dir=tmp_path)
    assert report.lines == 27 and report.captions_stored == 22 and report.already_cached == 0
    assert sorted(custom_id for _, custom_id, _ in report.failed) == sorted(failing)
    assert all("HTTP 400: context length exceeded" in reason for *_, reason in report.failed)
    assert report.unknown == [(25, "f" * 64)]
    assert [number for number, _ in report.malformed] == [26, 27]
    assert "unknown custom_id" in str(report) and "line 26: malformed" in str(report)
    engine_tokens = sum(
        json.loads(line)["response"]["body"]["usage"]["prompt_tokens"]
        for line in open(tmp_path / "results.jsonl").readlines()[:24]
        if json.loads(line)["response"]["status_code"] == 200
    )
    assert report.usage["prompt_tokens"] == engine_tokens  # the unknown line's tokens are not counted

    again = import_caption_results(tmp_path / "results.jsonl", cache_dir=tmp_path)  # idempotent
    assert again.captions_stored == 0 and again.already_cached == 22

    result = caption_dataset(labelled, captioner, domain="textures", cache_dir=tmp_path, show_progress=False)
    assert len(server.requests) == paid + 2  # only the two failed lines were requested
    assert result.caption_summary.failures == []
    # the second export writes nothing: every caption is cached
    empty = export_caption_requests(
        labelled, tmp_path / "none.jsonl", captioner, domain="textures", cache_dir=tmp_path
    )
    assert empty.requests == 0 and empty.cache_hits == 36


def test_import_into_another_cache_stores_nothing(server, labelled, tmp_path):
    captioner = OpenAICompatibleCaptioner("fake-vlm", base_url=server.base_url, api_key_env=None)
    export_caption_requests(
        labelled.select(range(2)), tmp_path / "r.jsonl", captioner, domain="textures", cache_dir=tmp_path / "a"
    )
    run_engine(tmp_path / "r.jsonl", tmp_path / "o.jsonl")
    report = import_caption_results(tmp_path / "o.jsonl", cache_dir=tmp_path / "b")
    assert report.captions_stored == 0 and len(report.unknown) == 6
    result = caption_dataset(
        labelled.select(range(2)), captioner, domain="textures", cache_dir=tmp_path / "b", show_progress=False
    )
    assert result.caption_summary.cache_hits == 0


def test_export_rejects_a_captioner_without_a_request_body(labelled, tmp_path):
    class Local:
        def cache_identity(self):
            return {"backend": "local"}

        def caption(self, requests):
            return iter(())

    with pytest.raises(TypeError, match="needs an OpenAICompatibleCaptioner"):
        export_caption_requests(labelled, tmp_path / "r.jsonl", Local(), domain="textures", cache_dir=tmp_path)


def test_export_takes_the_settings_exactly_as_caption_dataset_does(labelled, tmp_path):
    # one settings constructor: a string class_names ("abc", 3 letters for 3 classes) is refused by both, not read
    # by the export as the names 'a', 'b', 'c' (its prompts would then differ from every later caption_dataset call)
    captioner = OpenAICompatibleCaptioner("fake-vlm", api_key_env=None)
    for call in (
        lambda: caption_dataset(labelled, captioner, domain="textures", class_names="abc", cache_dir=tmp_path),
        lambda: export_caption_requests(
            labelled, tmp_path / "r.jsonl", captioner, domain="textures", class_names="abc", cache_dir=tmp_path
        ),
    ):
        with pytest.raises(ValueError, match="class_names is the string 'abc'; pass a list"):
            call()
    assert not (tmp_path / "r.jsonl").exists()


def test_output_lines_of_every_shape():
    from mmft_hf.captioning.batch_files import parse_output_line

    body = completion({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a b c"}]}]})
    ok = parse_output_line(json.dumps({"custom_id": "k", "response": {"status_code": 200, "body": body}}))
    assert ok[0] == "k" and ok[1].text == "a b c" and ok[1].usage["completion_tokens"] == 3
    bare = parse_output_line(json.dumps({"custom_id": "k", "response": body, "error": None}))  # completion as response
    assert bare[1].text == "a b c"
    expired = parse_output_line(json.dumps({"custom_id": "k", "error": {"code": "batch_expired", "message": "late"}}))
    assert expired[1].text is None and expired[1].error == "batch error batch_expired: late"
    refused = {**body, "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant",
               "content": None, "refusal": "no"}}]}  # fmt: skip
    result = parse_output_line(json.dumps({"custom_id": "k", "response": {"status_code": 200, "body": refused}}))[1]
    assert (result.text, result.refusal, result.finish_reason) == ("", "no", "stop")  # judged by the engine's gate
    assert expired[1].processed is False and ok[1].processed is True  # a line never run is not billed
    for line, message in (
        ("{", "not valid JSON"),
        ('{"response": {}}', "no string 'custom_id'"),
        ('{"custom_id": "k", "response": {"status_code": 200}}', "neither a 'response'"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_output_line(line)


def test_export_reports_a_row_without_an_image_as_caption_dataset_does(server, tmp_path, caplog):
    # a row whose image is None is not skipped silently: the export lists it (row, column, fix) in its summary and
    # log, exactly as caption_dataset reports it, and still writes every request of the good rows
    import logging

    import datasets
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (8, 8), "red"), None, Image.new("RGB", (9, 9), "blue")], "label": [0, 1, 1]},
        features=features,
    )
    captioner = OpenAICompatibleCaptioner("fake-vlm", base_url=server.base_url, api_key_env=None)
    with caplog.at_level(logging.WARNING, logger="mmft_hf"):
        exported = export_caption_requests(ds, tmp_path / "r.jsonl", captioner, domain="things", cache_dir=tmp_path)
    assert exported.requests == 6 and len(open(tmp_path / "r.jsonl").readlines()) == 6  # the good rows
    assert [(failure.row, failure.caption_type) for failure in exported.failures] == [(1, t) for t in TYPES]
    reason = exported.failures[0].reason
    assert "column 'image'" in reason and "None" in reason and "drop the row" in reason
    assert "3 caption(s) not written" in str(exported) and "row 1, caption type 'visual'" in str(exported)
    assert "row 1, caption type 'visual'" in caplog.text
    result = caption_dataset(ds, captioner, domain="things", cache_dir=tmp_path / "c", show_progress=False)
    assert result.caption_summary.failures == exported.failures  # one report, whichever path
