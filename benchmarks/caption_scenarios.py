"""Captioning's promises under the seven failure scenarios of issue 13, as real processes on loopback.

Each scenario runs the real command line (`mmft-hf caption`) or `caption_dataset` against the loopback servers of
tests/fake_chat_server.py and tests/fake_batch_api.py, at the issue's sizes, and prints what was paid against what
was needed, the exit status and the seconds to stop:

1. a batch run SIGKILLed after creating its batch, then a synchronous run on the same cache (then a batch rerun);
2. a batch run started while a synchronous run holds claims on the same captions;
3. a server answering HTTP 500 to everything (15 rows and 2 rows);
4. a server that stops answering after 10 requests, and one that hangs from the start (`--timeout 10`);
   `4default` is the same stop with default flags (one 60 s timeout);
5. 1 in 5 answers refused or cut, synchronous; and the import of unusable answers;
6. an expired batch, two runs sharing one batch, an import report with 12 bad lines.
(Scenario 7, the cost estimate on a 54/6 split, is tests/captioning/test_estimate.py.)

Run from the repository root (about 3 minutes; scenario 4default adds about 80 s):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/caption_scenarios.py [1 2 3 4 4default 5 6]
"""

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
import datasets  # noqa: E402
from PIL import Image  # noqa: E402

from tests.fake_batch_api import start_fake_batch_api  # noqa: E402
from tests.fake_chat_server import (  # noqa: E402
    HANG,
    REFUSAL,
    answer,
    chat_completion,
    start_fake_api,
    stops_answering_after,
    wait_until_quiet,
)

ENV = {
    **os.environ,
    "PYTHONPATH": str(ROOT),
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}


def source(tmp, rows):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a_b", "c", "d"])})
    images = [Image.new("RGB", (16 + i % 40, 16 + i // 40), (3 * i % 256, 10, 200 - i % 200)) for i in range(rows)]
    ds = datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(rows)]}, features=features)
    ds.save_to_disk(f"{tmp}/ds{rows}")
    return f"{tmp}/ds{rows}"


def cli(src, server, cache, *extra, captioner="openai:fake-mllm"):
    command = [sys.executable, "-m", "mmft_hf.cli", "caption", "--dataset_name", src, "--domain", "textures",
               "--captioner", captioner, "--base_url", server.base_url, "--api_key_env", "none", "--cache_dir", cache,
               "--max_retries", "0", "--poll_interval_s", "0.1", *map(str, extra)]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    return done, time.monotonic() - started


def statuses(cache):
    with sqlite3.connect(f"{cache}/captions.sqlite") as c:
        return [s for (s,) in c.execute("SELECT status FROM submissions")]


def scenario_1(tmp):
    src, cache = source(tmp, 15), f"{tmp}/c1"
    server = start_fake_batch_api(hold=True)
    worker = subprocess.Popen([sys.executable, str(ROOT / "tests/scripts/batch_caption_worker.py"), src, cache,
                               server.base_url], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    while len(server.retrieves) < 2:
        time.sleep(0.02)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    server.hold = False
    done, seconds = cli(src, server, cache, "--output_dir", f"{tmp}/out1")
    print(
        f"1. open batch + sync run: captions needed 45, chat requests paid {len(server.requests)}, batch lines "
        f"{len(server.processed)}, batches {len(server.created)}, exit {done.returncode}, {seconds:.1f} s; "
        f"submissions {statuses(cache)}"
    )
    done, seconds = cli(src, server, cache, "--output_dir", f"{tmp}/out1b", captioner="openai-batch:fake-mllm")
    print(
        f"   later batch rerun: exit {done.returncode}, {seconds:.1f} s, batches {len(server.created)}, "
        f"submissions {statuses(cache)} (none open)"
    )


def scenario_2(tmp):
    src, cache = source(tmp, 60), f"{tmp}/c2"
    server = start_fake_batch_api()
    server.delay = 0.3
    sync = subprocess.Popen([sys.executable, str(ROOT / "tests/scripts/caption_worker.py"), src, cache,
                             server.base_url, "--max_concurrency", "4"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    while len(server.requests) < 4:
        time.sleep(0.02)
    done, seconds = cli(src, server, cache, "--output_dir", f"{tmp}/out2", captioner="openai-batch:fake-mllm")
    sync.wait()
    loaded = datasets.load_dataset(f"{tmp}/out2", cache_dir=f"{tmp}/hf")["train"] if done.returncode == 0 else None
    missing = 180 - sum(len(r) for r in loaded["captions"]) if loaded is not None else "not written"
    summary = re.search(r"Captioned .*?\)", done.stdout)
    print(
        f"2. batch run during a live sync run: captions needed 180, chat requests {len(server.requests)}, batch "
        f"lines {len(server.processed)}, exit {done.returncode}, {seconds:.1f} s, missing in its dataset {missing}; "
        f"{summary[0] if summary else done.stderr[-300:]}"
    )


def scenario_5(tmp):
    src, cache = source(tmp, 60), f"{tmp}/c5"
    bad = [answer(REFUSAL), answer("A striped texture cut mid", finish_reason="length")]
    server = start_fake_api(plan=[step for i in range(180) for step in ([bad[i % 2]] if i % 5 == 4 else [(200, {})])])
    done, seconds = cli(src, server, cache, "--max_concurrency", "4", "--max_answer_retries", "0", "--output_dir",
                        f"{tmp}/out5")  # fmt: skip
    with sqlite3.connect(f"{cache}/captions.sqlite") as c:
        stored_bad = c.execute(
            "SELECT COUNT(*) FROM captions WHERE text LIKE '%sorry%' OR text LIKE '%cut mid%'"
        ).fetchone()[0]
    rejected = re.search(r"rejected by the quality gate \(asked again\): (\{.*?\})", done.stdout)
    print(
        f"5a. sync, 1 in 5 answers refused or cut: 180 captions, requests {len(server.requests)}, unusable stored "
        f"{stored_bad}, rejected {rejected[1] if rejected else None}, exit {done.returncode}, {seconds:.1f} s"
    )
    export, _ = cli(src, server, f"{tmp}/c5b", "--export_requests", f"{tmp}/req.jsonl")
    ids = [json.loads(line)["custom_id"] for line in open(f"{tmp}/req.jsonl")]
    bodies = [
        chat_completion(REFUSAL),
        chat_completion("cut", finish_reason="length"),
        chat_completion("lorem ipsum " * 1700),
    ]
    with open(f"{tmp}/res.jsonl", "w") as out:
        for custom_id, body in zip(ids, bodies):
            out.write(json.dumps({"custom_id": custom_id, "response": {"status_code": 200, "body": body}}) + "\n")
    from mmft_hf.captioning.offline import import_caption_results

    report = import_caption_results(f"{tmp}/res.jsonl", cache_dir=f"{tmp}/c5b")
    print(
        f"5b. import of a refusal, a cut answer and a 20,000-character answer: stored {report.captions_stored}, "
        f"failed {len(report.failed)}, rejected {report.rejected}"
    )


def scenario_6(tmp):
    from mmft_hf.captioning.caption import caption_dataset
    from mmft_hf.captioning.captioners.openai_batch import OpenAIBatchCaptioner
    from mmft_hf.captioning.offline import import_caption_results

    ds = datasets.load_from_disk(source(tmp, 100))
    server = start_fake_batch_api(script=[{"final": "expired", "fraction": 0.6}])
    captioner = OpenAIBatchCaptioner("fake-mllm", base_url=server.base_url, api_key_env=None, poll_interval_s=0.01)
    result = caption_dataset(ds, captioner, domain="textures", cache_dir=f"{tmp}/c6", max_passes=1, allow_missing=True,
                             show_progress=False)  # fmt: skip
    print(
        f"6a. expired batch: planned 300 requests, provider ran {len(server.processed)} lines, summary says "
        f"{result.caption_summary.requests} requests"
    )
    server = start_fake_batch_api(hold=True)
    results = {}

    def run(name):
        results[name] = caption_dataset(ds.select(range(30)), OpenAIBatchCaptioner(
            "fake-mllm", base_url=server.base_url, api_key_env=None, poll_interval_s=0.01), domain="textures",
            cache_dir=f"{tmp}/c6b", show_progress=False)  # fmt: skip

    first = threading.Thread(target=run, args=("first",))
    first.start()
    while len(server.retrieves) < 2:
        time.sleep(0.01)
    second = threading.Thread(target=run, args=("second",))
    second.start()
    time.sleep(0.5)
    server.hold = False
    first.join()
    second.join()
    print(
        f"6b. two runs sharing one batch ({len(server.created)} batch): first reports "
        f"{results['first'].caption_summary.requests} lines / {results['first'].caption_summary.usage.get('total_tokens')} "
        f"tokens, second {results['second'].caption_summary.requests} lines / "
        f"{results['second'].caption_summary.usage.get('total_tokens')} tokens"
    )
    lines = [json.dumps({"custom_id": f"{n:064x}", "response": {"status_code": 200, "body": {}}}) for n in range(12)]
    Path(f"{tmp}/bad.jsonl").write_text("\n".join(lines) + "\n")
    report = str(import_caption_results(f"{tmp}/bad.jsonl", cache_dir=f"{tmp}/c6b"))
    print(
        f"6c. import with 12 bad lines: {report.count(': unknown custom_id')} listed, 'and 2 more': "
        f"{'... and 2 more' in report}"
    )


def failing_server_run(tmp, name, rows, default, plan=(), extra=()):
    """`mmft-hf caption` against a server that fails as `default` after `plan`; prints how the run ended."""
    src, root = source(tmp, rows), f"{tmp}/{name}"
    shutil.rmtree(root, ignore_errors=True)
    server = start_fake_api(plan=list(plan), default=default)
    command = [sys.executable, "-m", "mmft_hf.cli", "caption", "--dataset_name", src, "--domain", "textures",
               "--captioner", "openai:fake-mllm", "--base_url", server.base_url, "--api_key_env", "none",
               "--cache_dir", f"{root}/cache", "--output_dir", f"{root}/out", *extra]  # fmt: skip
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=900)
    end = time.monotonic()
    requests = wait_until_quiet(server, 0.5)
    first = server.requests[0][0] if server.requests else end
    error = [line for line in done.stderr.splitlines() if "error" in line.lower()][-1:]
    print(f"{name}: {rows} rows, exit {done.returncode}, {requests} requests, {end - start:.1f} s "
          f"({end - first:.1f} s after the first request), written: {os.path.exists(root + '/out')}; "
          f"{error[0][:200] if error else ''}")  # fmt: skip
    server.shutdown()
    server.server_close()


def scenario_3(tmp):
    failing_server_run(tmp, "3. HTTP 500 to everything", 15, (500, {}))
    failing_server_run(tmp, "3. HTTP 500 to everything", 2, (500, {}))


def scenario_4(tmp):
    failing_server_run(tmp, "4. stops answering after 10 requests, --timeout 10", 15, HANG,
                       plan=stops_answering_after(10), extra=["--timeout", "10"])  # fmt: skip
    failing_server_run(tmp, "4. hangs from the start, --timeout 10", 15, HANG, extra=["--timeout", "10"])


def scenario_4default(tmp):
    failing_server_run(tmp, "4. stops answering after 10 requests, default flags", 15, HANG,
                       plan=stops_answering_after(10))  # fmt: skip


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        for name in sys.argv[1:] or ("1", "2", "3", "4", "5", "6"):
            globals()[f"scenario_{name}"](tmp)
