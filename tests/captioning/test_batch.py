"""The Batch API captioner against a loopback OpenAI Batch API (tests/fake_batch_api.py): files, batches, statuses."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
from PIL import Image

from mmft_hf import OpenAIBatchCaptioner, caption_dataset
from mmft_hf.captioning.captioners import OpenAIBatchCaptioner as ExportedFromCaptioners
from mmft_hf.captioning.captioners.base import CaptionRequest
from mmft_hf.captioning.captioners.openai_compatible import OpenAICompatibleCaptioner
from mmft_hf.captioning.engine import cancel_open_batches
from mmft_hf.captioning.prompts import build_prompt

TYPES = ("visual", "shape", "texture")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def labelled(image_files_dataset):
    return image_files_dataset.remove_columns("captions")


def batch_captioner(server, **kwargs):
    kwargs = {"api_key_env": None, "poll_interval_s": 0.01, "max_retries": 0, **kwargs}
    return OpenAIBatchCaptioner("fake-vlm", base_url=server.base_url, **kwargs)


def expected_captions(ds, row, types=TYPES):
    name = ds.features["label"].names[ds[row]["label"]]
    return [build_prompt(name, "textures", kind) for kind in types]


def test_batch_run_makes_no_chat_request_and_fills_the_cache(batch_api, labelled, tmp_path):
    server = batch_api()
    result = caption_dataset(
        labelled, batch_captioner(server), domain="textures", cache_dir=tmp_path, show_progress=False
    )
    summary = result.caption_summary
    assert server.requests == []  # zero chat-completion requests: everything went through the batch
    assert len(server.uploads) == len(server.created) == 1 and len(server.processed) == 36
    assert summary.failures == [] and summary.requests == 36 and summary.passes == 1
    assert summary.usage["prompt_tokens"] > 36 * 85  # usage comes from the output file
    for row in range(len(labelled)):
        assert result[row]["captions"] == expected_captions(labelled, row)
    batch = server.batches[server.created[0]]
    assert batch["status"] == "completed" and batch["endpoint"] == "/v1/chat/completions"
    # the ledger closed the batch with its final status
    with sqlite3.connect(tmp_path / "captions.sqlite") as connection:
        assert connection.execute("SELECT remote_id, status FROM submissions").fetchall() == [
            (server.created[0], "completed")
        ]
    # a synchronous run with the same settings finds every caption: batch and sync captions are interchangeable
    sync = OpenAICompatibleCaptioner("fake-vlm", base_url=server.base_url, api_key_env=None)
    again = caption_dataset(labelled, sync, domain="textures", cache_dir=tmp_path, show_progress=False)
    assert again.caption_summary.requests == 0 and server.requests == []
    assert OpenAIBatchCaptioner is ExportedFromCaptioners


def test_batch_body_is_the_synchronous_body(batch_api, tmp_path):
    server = batch_api()
    settings = {"temperature": 0.3, "max_tokens": 40, "extra_body": {"top_k": 5}, "max_image_side": 32}
    image = Image.new("RGB", (80, 40), (200, 10, 10))
    sync = OpenAICompatibleCaptioner("fake-vlm", base_url=server.base_url, api_key_env=None, **settings)
    list(sync.caption([CaptionRequest(image, "describe it")]))
    ((_, _, sync_body),) = server.requests
    line = json.loads(batch_captioner(server, **settings).request_line("key-1", CaptionRequest(image, "describe it")))
    assert line == {"custom_id": "key-1", "method": "POST", "url": "/v1/chat/completions", "body": sync_body}


def test_split_above_request_and_size_limits(batch_api, labelled, tmp_path):
    server = batch_api()
    captioner = batch_captioner(server, max_requests_per_batch=10)
    result = caption_dataset(labelled, captioner, domain="textures", cache_dir=tmp_path, show_progress=False)
    assert len(server.created) == 4 and result.caption_summary.failures == []
    sizes = [len(server.contents[server.batches[b]["input_file_id"]].splitlines()) for b in server.created]
    assert sizes == [10, 10, 10, 6]
    # a file-size bound splits too: each request line of these small images is a few kB
    server2 = batch_api()
    one_line = len(server.contents[server.batches[server.created[0]]["input_file_id"]].splitlines()[0]) + 1
    captioner = batch_captioner(server2, max_batch_file_bytes=int(one_line * 5.5))
    result = caption_dataset(labelled, captioner, domain="textures", cache_dir=tmp_path / "b", show_progress=False)
    assert result.caption_summary.failures == []
    assert all(len(server2.contents[f]) <= one_line * 5.5 for f in server2.uploads)
    assert len(server2.created) >= 36 // 6


def test_per_line_errors_end_complete_after_a_second_batch_pass(batch_api, labelled, tmp_path):
    failing = set()

    def line_error(custom_id):
        if len(failing) < 5 or custom_id in failing:
            failing.add(custom_id)
            return 500
        return None

    server = batch_api(script=[{"line_error": line_error}])
    result = caption_dataset(
        labelled, batch_captioner(server), domain="textures", cache_dir=tmp_path, show_progress=False
    )
    summary = result.caption_summary
    assert summary.failures == [] and summary.passes == 2 and len(server.created) == 2
    second = server.contents[server.batches[server.created[1]]["input_file_id"]].decode().splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in second) == sorted(failing)  # only what failed
    assert server.requests == []
    assert all(len(result[row]["captions"]) == 3 for row in range(len(labelled)))


def test_sync_retry_of_a_failed_batch_and_rows_reported_when_all_fail(batch_api, labelled, tmp_path):
    server = batch_api(script=[{"final": "failed"}])
    captioner = batch_captioner(server, retry_failed="sync")
    result = caption_dataset(labelled, captioner, domain="textures", cache_dir=tmp_path, show_progress=False)
    assert result.caption_summary.failures == [] and len(server.created) == 1
    assert len(server.requests) == 36  # the second pass went through chat completions

    server = batch_api(script=[{"final": "expired", "fraction": 0.5}, {"final": "failed"}])
    result = caption_dataset(
        labelled, batch_captioner(server), domain="textures", cache_dir=tmp_path / "b", max_passes=2,
        show_progress=False, allow_missing=True,
    )  # fmt: skip
    failures = result.caption_summary.failures
    assert len(failures) == 18 and len(server.created) == 2  # half ran before the expiry; the retry batch failed
    # the summary counts what the provider ran (18 lines before the expiry), not the 36 + 18 requests planned
    assert result.caption_summary.requests == 18 and len(server.processed) == 18
    assert all("ended 'failed'" in failure.reason and "bad file" in failure.reason for failure in failures)
    assert sum(len(row) for row in result["captions"]) == 18


def test_cancelled_batch_keeps_what_ran(batch_api, labelled, tmp_path):
    server = batch_api(script=[{"final": "cancelled", "fraction": 0.25}])
    result = caption_dataset(
        labelled, batch_captioner(server), domain="textures", cache_dir=tmp_path, max_passes=1, show_progress=False,
        allow_missing=True,
    )  # fmt: skip
    assert sum(len(row) for row in result["captions"]) == 9
    assert all("batch_cancelled" in failure.reason for failure in result.caption_summary.failures)


def _open_submissions(cache_file):
    try:
        with sqlite3.connect(cache_file) as connection:
            return connection.execute("SELECT remote_id FROM submissions WHERE remote_id IS NOT NULL").fetchall()
    except sqlite3.OperationalError:
        return []


def test_sigkill_while_polling_then_rerun_polls_the_same_batch(batch_api, tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a_b", "c"])})
    images = [Image.new("RGB", (16 + i, 16), (30 * i, 10, 200 - 20 * i)) for i in range(6)]
    datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(6)]}, features=features).save_to_disk(
        str(tmp_path / "ds")
    )
    server = batch_api(hold=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "tests/scripts/batch_caption_worker.py"), str(tmp_path / "ds")]
    command += [str(tmp_path / "cache"), server.base_url]
    worker = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while len(server.retrieves) < 3:  # submitted, recorded, and polled a few times
            assert worker.poll() is None, worker.stdout.read().decode()
            assert time.monotonic() < deadline, "the worker never polled"
            time.sleep(0.02)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert len(server.created) == 1 and server.batches[server.created[0]]["status"] == "in_progress"
    assert _open_submissions(tmp_path / "cache" / "captions.sqlite") == [(server.created[0],)]
    server.hold = False
    captioner = OpenAIBatchCaptioner("fake-mllm", base_url=server.base_url, api_key_env=None, poll_interval_s=0.01)
    result = caption_dataset(
        datasets.load_from_disk(str(tmp_path / "ds")), captioner, domain="textures", cache_dir=tmp_path / "cache",
        show_progress=False,
    )  # fmt: skip
    assert len(server.created) == 1 and len(server.uploads) == 1  # polled the same batch: nothing paid twice
    assert server.requests == [] and len(server.processed) == 18
    assert result.caption_summary.requests == 18 and result.caption_summary.failures == []
    assert result[0]["captions"] == [build_prompt("a b", "textures", kind) for kind in TYPES]


def test_killed_between_creating_and_recording_the_batch_finds_it_again(batch_api, labelled, tmp_path, monkeypatch):
    from mmft_hf.captioning.ledger import SubmissionLedger

    server = batch_api(hold=True)
    original = SubmissionLedger.set_remote_id

    def die(self, submission_id, remote_id):
        raise SystemExit("killed right after batches.create")

    monkeypatch.setattr(SubmissionLedger, "set_remote_id", die)
    with pytest.raises(SystemExit):
        caption_dataset(labelled, batch_captioner(server), domain="textures", cache_dir=tmp_path, show_progress=False)
    assert len(server.created) == 1 and len(server.uploads) == 1  # the file is recorded, the batch id is not
    monkeypatch.setattr(SubmissionLedger, "set_remote_id", original)
    server.hold = False
    result = caption_dataset(
        labelled, batch_captioner(server), domain="textures", cache_dir=tmp_path, show_progress=False
    )
    assert len(server.created) == 1 and len(server.uploads) == 1  # found by its input file: not created again
    assert result.caption_summary.failures == [] and server.requests == []


def _claims(cache_file):
    try:
        with sqlite3.connect(cache_file) as connection:
            return connection.execute("SELECT COUNT(*) FROM claims").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_two_live_batch_runs_sharing_a_cache_submit_once(batch_api, labelled, tmp_path):
    # promise: a batch run waits for (then reads) what a live run claimed, as a synchronous run does, and only the
    # run that collected the batch reports its lines and tokens
    import threading

    server = batch_api(hold=True)
    server.upload_delay = 1.0
    results = {}

    def run(name):
        results[name] = caption_dataset(
            labelled, batch_captioner(server), domain="textures", cache_dir=tmp_path, show_progress=False
        )

    threads = {name: threading.Thread(target=run, args=(name,)) for name in ("first", "racing", "later")}
    threads["first"].start()
    try:
        deadline = time.monotonic() + 60
        while _claims(tmp_path / "captions.sqlite") < 36:  # the first run claimed; it is uploading, nothing recorded
            assert time.monotonic() < deadline and threads["first"].is_alive()
            time.sleep(0.01)
        threads["racing"].start()
        while len(server.retrieves) < 2:  # the first run's batch is recorded and polled
            assert time.monotonic() < deadline and threads["first"].is_alive()
            time.sleep(0.01)
        threads["later"].start()  # started while the first run polls its open batch
        time.sleep(0.5)
        assert threads["racing"].is_alive() and threads["later"].is_alive()  # both wait: neither wrote a dataset
    finally:
        server.hold = False
        for thread in threads.values():
            if thread.is_alive():
                thread.join(60)
    assert len(server.created) == 1 and len(server.uploads) == 1  # the other runs paid for nothing
    first = results["first"].caption_summary
    assert first.failures == [] and first.requests == 36 and first.usage["prompt_tokens"] > 0
    for name in ("racing", "later"):
        summary = results[name].caption_summary
        assert summary.failures == [] and summary.from_other_runs == 36
        assert summary.requests == 0 and summary.usage == {}  # the batch's tokens are reported once, by the first
    third = caption_dataset(
        labelled, batch_captioner(server), domain="textures", cache_dir=tmp_path, show_progress=False
    )
    assert third.caption_summary.cache_hits == 36 and len(server.created) == 1
    assert "tokens" not in str(third.caption_summary)  # nothing billed: no empty `tokens {}`


def test_unusable_batch_api_stops_the_run_with_one_clear_error(batch_api, labelled, tmp_path):
    from mmft_hf.captioning.captioners import CaptionerConnectionError, CaptionerModelNotFoundError

    server = batch_api()
    server.batch_api = False  # a server with chat completions only, like vLLM's
    with pytest.raises(CaptionerModelNotFoundError, match="export the requests for `vllm run-batch`"):
        caption_dataset(labelled, batch_captioner(server), domain="textures", cache_dir=tmp_path, show_progress=False)
    closed = OpenAIBatchCaptioner("m", base_url="http://127.0.0.1:9/v1", api_key_env=None, max_retries=0)
    with pytest.raises(CaptionerConnectionError, match="Cannot reach the Batch API at http://127.0.0.1:9/v1"):
        caption_dataset(labelled, closed, domain="textures", cache_dir=tmp_path, show_progress=False)


def test_unreadable_image_is_reported_and_duplicate_rows_share_one_request(batch_api, tmp_path):
    from mmft_hf.captioning.offline import export_caption_requests

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    good = Image.new("RGB", (20, 20), (1, 2, 3))
    ds = datasets.Dataset.from_dict(
        {"image": [good, {"bytes": b"not an image", "path": None}, good], "label": [0, 1, 0]}, features=features
    )
    server = batch_api()
    result = caption_dataset(
        ds, batch_captioner(server), domain="textures", cache_dir=tmp_path, max_passes=1, show_progress=False
    )
    failures = result.caption_summary.failures
    assert [failure.row for failure in failures] == [1, 1, 1]
    assert all("cannot be read" in failure.reason for failure in failures)
    # rows 0 and 2 hold the same image bytes and class: one request per caption serves both (distinct custom_ids)
    assert len(server.processed) == 3 and result.caption_summary.requests == 3 and result["captions"][1] == []
    assert result["captions"][0] == result["captions"][2] and len(result["captions"][0]) == 3
    exported = export_caption_requests(
        ds, tmp_path / "r.jsonl", batch_captioner(server), domain="textures", cache_dir=tmp_path / "x"
    )
    assert exported.requests == 3 and len(exported.failures) == 3 and "row 1" in str(exported.failures[0])


def test_cancel_open_batches_keeps_what_finished(batch_api, labelled, tmp_path):
    import threading

    server = batch_api(hold=True)
    results = {}

    def run():
        results["run"] = caption_dataset(
            labelled, batch_captioner(server), domain="textures", cache_dir=tmp_path, max_passes=1,
            show_progress=False, allow_missing=True,
        )  # fmt: skip

    thread = threading.Thread(target=run)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while len(server.retrieves) < 2:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.01)
        assert cancel_open_batches(batch_captioner(server), tmp_path) == server.created
    finally:
        server.hold = False
        thread.join(60)
    assert server.batches[server.created[0]]["status"] == "cancelled"
    summary = results["run"].caption_summary
    assert summary.captions_done == 18 and all("batch_cancelled" in failure.reason for failure in summary.failures)
    assert cancel_open_batches(batch_captioner(server), tmp_path) == []  # closed in the cache once read


def test_a_sync_run_waits_for_a_batch_a_live_run_polls(batch_api, labelled, tmp_path):
    import threading

    server = batch_api(hold=True)
    results = {}

    def batch_run():
        results["batch"] = caption_dataset(
            labelled, batch_captioner(server), domain="textures", cache_dir=tmp_path, show_progress=False
        )

    thread = threading.Thread(target=batch_run)
    thread.start()
    sync = OpenAICompatibleCaptioner("fake-vlm", base_url=server.base_url, api_key_env=None, max_retries=0)
    try:
        deadline = time.monotonic() + 60
        while len(server.retrieves) < 2:  # the batch is recorded and polled by a live run
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.01)
        threading.Timer(0.5, setattr, (server, "hold", False)).start()  # the provider finishes a little later
        waited = caption_dataset(labelled, sync, domain="textures", cache_dir=tmp_path, show_progress=False)
    finally:
        server.hold = False
        thread.join(60)
    assert server.requests == [] and len(server.created) == 1  # the sync run paid for nothing: it waited
    assert waited.caption_summary.from_other_runs == 36 and waited.caption_summary.requests == 0
    assert results["batch"].caption_summary.requests == 36


def test_an_open_batch_of_another_endpoint_stops_a_run_that_cannot_poll_it(batch_api, labelled, tmp_path, monkeypatch):
    from mmft_hf.captioning.engine import OpenBatchError

    server = batch_api(hold=True)

    def killed(self, batch_id):  # the run stops while polling: its batch stays open in the ledger
        raise SystemExit("killed while polling")

    monkeypatch.setattr(OpenAIBatchCaptioner, "batch_status", killed)
    with pytest.raises(SystemExit):
        caption_dataset(labelled, batch_captioner(server), domain="textures", cache_dir=tmp_path, show_progress=False)
    other = batch_api()  # the same model served elsewhere, synchronous only: it cannot poll that provider's batch
    sync = OpenAICompatibleCaptioner("fake-vlm", base_url=other.base_url, api_key_env=None, max_retries=0)
    with pytest.raises(OpenBatchError, match=f"36 caption.s. this run needs are in 1 open batch.*{server.base_url}"):
        caption_dataset(labelled, sync, domain="textures", cache_dir=tmp_path, show_progress=False)
    assert other.requests == [] and server.requests == []  # nothing paid twice


def test_cut_batch_lines_are_asked_again_in_the_next_batch_with_a_raised_limit(batch_api, labelled, tmp_path):
    # the batch server cuts answers at max_tokens words (the echoed prompt is 22): the next pass's batch asks the cut
    # lines with the limit doubled, so they are not cut, and paid, again
    server = batch_api()
    rows = labelled.select(range(2))
    result = caption_dataset(
        rows, batch_captioner(server, max_tokens=12), domain="textures", cache_dir=tmp_path, show_progress=False
    )
    limits = [
        {json.loads(line)["body"]["max_tokens"] for line in server.contents[file_id].decode().splitlines()}
        for file_id in server.uploads
    ]
    assert limits == [{12}, {24}] and server.requests == []
    assert [result[row]["captions"] for row in (0, 1)] == [expected_captions(rows, row) for row in (0, 1)]
    summary = result.caption_summary
    assert summary.requests == 12 and summary.cut == 6 and summary.passes == 2
    assert "6 answer(s) cut by the token limit" in str(summary)
