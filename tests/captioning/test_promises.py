"""The captioning promises, each run as a real process (the `mmft-hf caption` command or a worker script) against
the loopback servers: never pay twice (an open batch and a live run's claims are respected by every engine), never
write a dataset with captions missing for server reasons unless asked, the same quality gate on every path, and
summaries that count what the provider processed."""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
from PIL import Image

from tests.fake_chat_server import HOLD, HUGE, REFUSAL, answer, chat_completion, start_fake_api

ROOT = Path(__file__).resolve().parents[2]
ENV = {
    **os.environ,
    "PYTHONPATH": str(ROOT),
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}


@pytest.fixture
def tiny_source(tmp_path):
    """6 distinct tiny images, 2 classes, saved with `save_to_disk` (18 captions)."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a_b", "c"])})
    images = [Image.new("RGB", (16 + i, 16), (30 * i, 10, 200 - 20 * i)) for i in range(6)]
    ds = datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(6)]}, features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    return str(tmp_path / "ds")


def cli(source, server, cache_dir, *extra, timeout=120):
    """`mmft-hf caption` in its own process; returns the finished process."""
    script = Path(sys.executable).with_name("mmft-hf")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "mmft_hf.cli"]
    command += [
        "caption", "--dataset_name", source, "--domain", "textures", "--captioner", "openai:fake-mllm",
        "--base_url", server.base_url, "--api_key_env", "none", "--cache_dir", str(cache_dir), "--max_retries", "0",
        *extra,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ENV)


def worker(name, *args):
    command = [sys.executable, str(ROOT / "tests/scripts" / name), *map(str, args)]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, process, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def finish(process, timeout=120):
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return output


def submissions(cache_dir):
    with sqlite3.connect(Path(cache_dir) / "captions.sqlite") as connection:
        return connection.execute("SELECT remote_id, status FROM submissions ORDER BY created").fetchall()


def start_and_kill_a_batch_run(batch_api, source, cache_dir):
    """A batch run killed (SIGKILL) while it polls its batch: the provider keeps the batch, the ledger has it open."""
    server = batch_api(hold=True)
    process = worker("batch_caption_worker.py", source, cache_dir, server.base_url)
    try:
        wait_for(lambda: len(server.retrieves) >= 2, process, "the batch run polls its batch")
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        finish(process)
    assert submissions(cache_dir) == [(server.created[0], "open")]
    return server


def test_a_sync_run_collects_an_open_batch_instead_of_paying_again(batch_api, tiny_source, tmp_path):
    server = start_and_kill_a_batch_run(batch_api, tiny_source, tmp_path / "cache")
    server.hold = False  # the provider finishes the batch
    finished = cli(tiny_source, server, tmp_path / "cache", "--output_dir", tmp_path / "out")
    assert finished.returncode == 0, finished.stderr
    assert server.requests == []  # not one caption of the open batch asked again synchronously
    assert len(server.created) == len(server.uploads) == 1 and len(server.processed) == 18
    assert submissions(tmp_path / "cache") == [(server.created[0], "completed")]  # collected and closed
    # the summary counts the batch lines this run collected, and their tokens, once
    assert "18/18 captions (0 from cache, 18 requests" in finished.stdout and "prompt_tokens" in finished.stdout
    loaded = datasets.load_dataset(str(tmp_path / "out"), cache_dir=str(tmp_path / "hf"))["train"]
    assert all(len(row) == 3 for row in loaded["captions"])


def test_a_batch_run_waits_for_the_captions_a_live_sync_run_claimed(batch_api, tiny_source, tmp_path):
    # the sync run captions shard 0 (3 rows, 9 captions, claimed at once) and is held after its first answer until
    # the batch run (the whole dataset) has submitted its batch: by then the batch run has found shard 0 claimed, so
    # it must wait for those captions and read them, whatever the two processes' start-up times
    server = batch_api()
    server.plan[:] = [(200, {})] + [HOLD] * 8
    sync = worker(
        "caption_worker.py", tiny_source, tmp_path / "cache", server.base_url, "--max_concurrency", 1,
        "--num_shards", 2, "--shard_index", 0,
    )  # fmt: skip
    batch = None
    try:
        wait_for(lambda: len(server.requests) >= 2, sync, "the sync run has claimed its shard and is held")
        batch = worker("batch_caption_worker.py", tiny_source, tmp_path / "cache", server.base_url)
        wait_for(lambda: server.created, batch, "the batch run has submitted the captions nobody claimed")
        server.resume.set()
        batch_output, sync_output = finish(batch), finish(sync)
    finally:
        server.resume.set()
        for process in (sync, batch):
            if process is not None:
                finish(process)
    assert batch.returncode == 0 and sync.returncode == 0, batch_output + sync_output
    assert len(server.requests) == 9 and len(server.created) == 1  # every caption paid once
    submitted = server.contents[server.batches[server.created[0]]["input_file_id"]].decode().splitlines()
    assert len(submitted) == 9  # shard 1's captions only: none the sync run had claimed
    found = re.search(r"18/18 captions \((\d+) from cache, (\d+) from another run, 9 requests", batch_output)
    assert found and int(found[2]) >= 8 and int(found[1]) + int(found[2]) == 9, batch_output  # waited, then read


def test_a_batch_rerun_after_a_kill_collects_and_closes_the_batch(batch_api, tiny_source, tmp_path):
    server = start_and_kill_a_batch_run(batch_api, tiny_source, tmp_path / "cache")
    server.hold = False
    rerun = worker("batch_caption_worker.py", tiny_source, tmp_path / "cache", server.base_url)
    output = finish(rerun)
    assert rerun.returncode == 0, output
    assert len(server.created) == len(server.uploads) == 1 and server.requests == []
    assert submissions(tmp_path / "cache") == [(server.created[0], "completed")]  # no batch left marked open
    assert "18/18 captions (0 from cache, 18 requests" in output


def test_missing_captions_for_server_reasons_write_nothing_unless_allowed(tiny_source, tmp_path):
    # one request at a time, no retries, one pass: the 6th and 8th requests fail with HTTP 500
    server = start_fake_api(plan=[(200, {})] * 5 + [(500, {}), (200, {}), (500, {})])
    try:
        flags = ("--max_concurrency", "1", "--max_passes", "1", "--output_dir", tmp_path / "out")
        failed = cli(tiny_source, server, tmp_path / "cache", *flags)
        assert failed.returncode != 0
        (error,) = [line for line in failed.stderr.splitlines() if "error:" in line]
        assert error.startswith("mmft-hf caption: error: 2 caption(s) still missing") and "--allow_missing" in error
        assert "nothing was written" in error and not (tmp_path / "out").exists()
        server.plan[:] = [(200, {}), (500, {})]  # the rerun asks for the 2 missing captions only; one fails again
        kept = cli(tiny_source, server, tmp_path / "cache", *flags, "--allow_missing")
        assert kept.returncode == 0, kept.stderr
        assert len(server.requests) == 18 + 2
        loaded = datasets.load_dataset(str(tmp_path / "out"), cache_dir=str(tmp_path / "hf"))["train"]
        assert sum(len(row) for row in loaded["captions"]) == 17
    finally:
        server.shutdown()
        server.server_close()


def test_the_quality_gate_on_the_sync_path(tiny_source, tmp_path):
    # the captioner does not re-ask itself (--max_answer_retries 0): the engine rejects, counts and asks again
    bad = [answer(REFUSAL), answer("A striped texture cut mid", finish_reason="length"), answer(HUGE)]
    server = start_fake_api(plan=[(200, {})] * 3 + bad)
    try:
        finished = cli(
            tiny_source, server, tmp_path / "cache", "--max_concurrency", "1", "--max_answer_retries", "0",
            "--output_dir", tmp_path / "out",
        )  # fmt: skip
        assert finished.returncode == 0, finished.stderr
        assert len(server.requests) == 18 + 3  # each rejected answer asked again once, in the second pass
        assert "{'refusal': 1, 'finish_reason=length': 1, 'too long': 1}" in finished.stdout
        loaded = datasets.load_dataset(str(tmp_path / "out"), cache_dir=str(tmp_path / "hf"))["train"]
        captions = [caption for row in loaded["captions"] for caption in row]
        assert len(captions) == 18 and not any("sorry" in c or "lorem" in c or "cut mid" in c for c in captions)
    finally:
        server.shutdown()
        server.server_close()


def test_the_quality_gate_on_the_batch_path(batch_api, tiny_source, tmp_path):
    bad = {}

    def unusable(custom_id):  # the first three lines of the first batch: a refusal, a cut answer, a runaway one
        if len(bad) < 3 and custom_id not in bad:
            bad[custom_id] = [
                chat_completion(content=None, refusal="I can't help with that."),
                chat_completion("A striped texture cut mid", finish_reason="length"),
                chat_completion(HUGE),
            ][len(bad)]
        return bad.get(custom_id)

    server = batch_api(script=[{"answer": unusable}])
    process = worker("batch_caption_worker.py", tiny_source, tmp_path / "cache", server.base_url)
    output = finish(process)
    assert process.returncode == 0, output
    assert len(server.created) == 2 and server.requests == []  # the rejected three went into a second batch
    second = server.contents[server.batches[server.created[1]]["input_file_id"]].decode().splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in second) == sorted(bad)
    assert "{'refusal': 1, 'finish_reason=length': 1, 'too long': 1}" in output
    with sqlite3.connect(tmp_path / "cache" / "captions.sqlite") as connection:
        texts = [text for (text,) in connection.execute("SELECT text FROM captions")]
    assert len(texts) == 18 and not any("lorem" in t or "cut mid" in t for t in texts)


def test_the_quality_gate_and_full_reports_on_the_import_path(tiny_source, tmp_path):
    server = start_fake_api()
    try:
        exported = cli(tiny_source, server, tmp_path / "cache", "--export_requests", tmp_path / "requests.jsonl")
        assert exported.returncode == 0, exported.stderr
        assert exported.stdout.count("Wrote 18 request(s)") == 1 and "Wrote" not in exported.stderr  # printed once
        assert "Captioning" not in exported.stderr  # no empty caption progress bar while exporting
        requests = [json.loads(line) for line in open(tmp_path / "requests.jsonl")]
        ids = [request["custom_id"] for request in requests]
        lines = []
        for custom_id, body in [
            (ids[0], chat_completion(REFUSAL)),
            (ids[1], chat_completion("A cut", finish_reason="length")),
            (ids[2], chat_completion("word " * 20_000)),
            (ids[3], chat_completion("A fine caption.")),
            (ids[3], chat_completion("Another caption for the same request.")),
        ]:  # fmt: skip
            lines.append(json.dumps({"custom_id": custom_id, "response": {"status_code": 200, "body": body}}))
        lines += [
            json.dumps({"custom_id": f"{n:064x}", "response": {"status_code": 200, "body": {}}}) for n in range(12)
        ]
        (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n")
        imported = cli(
            tiny_source, server, tmp_path / "cache", "--import_results", tmp_path / "results.jsonl", "--output_dir",
            tmp_path / "out",
        )  # fmt: skip
        assert imported.returncode == 0, imported.stderr
        report = imported.stdout
        assert report.count("Imported ") == 1 and "Imported " not in imported.stderr  # printed once
        assert "1 caption(s) stored" in report and "1 conflicting" in report and "3 failed" in report
        assert "{'refusal': 1, 'finish_reason=length': 1, 'too long': 1}" in report
        assert "line 5 (" in report and "conflict" in report  # the duplicate line with other text
        assert report.count(": unknown custom_id '") == 10 and "... and 2 more" in report  # 12: 10 + "2 more"
        assert len(server.requests) == 18 - 1  # the rejected three (and the rest) asked for; the imported one not
        loaded = datasets.load_dataset(str(tmp_path / "out"), cache_dir=str(tmp_path / "hf"))["train"]
        captions = [caption for row in loaded["captions"] for caption in row]
        assert "A fine caption." in captions and not any("sorry" in c or "word word" in c for c in captions)
    finally:
        server.shutdown()
        server.server_close()
