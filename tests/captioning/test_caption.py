import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import datasets
import pytest
from PIL import Image

from mmft_hf.captioning.cache import CACHE_FILENAME
from mmft_hf.captioning.caption import (
    CaptioningError,
    CaptioningInterrupted,
    caption_dataset,
    caption_provenance,
    merge_caption_shards,
    shard_bounds,
)
from mmft_hf.captioning.captioners.base import CaptionResult
from mmft_hf.captioning.prompts import build_prompt
from tests.fake_chat_server import start_fake_api, wait_until_quiet

TYPES = ("visual", "shape", "texture")


class FakeCaptioner:
    """Implements the captioner protocol in memory: records every request, fails the ones `fail` picks.

    Captions are numbered by request across all instances, so a cached caption is told apart from a new one.
    Results are yielded in reverse order to exercise completion-order handling.
    """

    issued = 0  # shared counter: caption numbers are unique in a test session
    _lock = threading.Lock()  # guards `issued`, which instances on other threads share

    def __init__(self, model="fake", fail=None, text=None, raise_after=None, delay=0.0):
        self.model, self.fail, self.text, self.raise_after, self.delay = model, fail, text, raise_after, delay
        self.requests = []

    def cache_identity(self):
        return {"backend": "fake", "model": self.model, "temperature": 0.2}

    def caption(self, requests):
        for index in reversed(range(len(requests))):
            request = requests[index]
            if self.raise_after is not None and len(self.requests) >= self.raise_after:
                raise PermissionError("HTTP 401: invalid API key")
            time.sleep(self.delay)
            with FakeCaptioner._lock:
                self.requests.append(request)
                FakeCaptioner.issued += 1
                number = FakeCaptioner.issued
            if self.fail and self.fail(request, self.requests):
                yield index, CaptionResult(text=None, error="HTTP 500: upstream failure", retries=2)
            else:
                text = self.text(request) if self.text else f" #{number} {request.prompt} "
                yield index, CaptionResult(text=text, usage={"prompt_tokens": 5, "completion_tokens": 7})


@pytest.fixture
def labelled(image_files_dataset):
    """12 rows on real PNG/JPEG files, 3 classes, plus an extra column that must be kept."""
    ds = image_files_dataset.remove_columns("captions")
    return ds.add_column("note", [f"n{i}" for i in range(len(ds))])


def prompts_of(ds, row, types=TYPES, domain="textures"):
    name = ds.features["label"].names[ds[row]["label"]]
    return [build_prompt(name, domain, kind) for kind in types]


def test_captions_order_columns_and_summary(labelled, tmp_path):
    fake = FakeCaptioner()
    result = caption_dataset(labelled, fake, domain="textures", cache_dir=tmp_path, show_progress=False)
    assert result.column_names == ["image", "label", "note", "captions"]
    assert result.features["captions"] == datasets.List(
        datasets.Value("string", id=result.features["captions"].feature.id)
    )
    assert list(result["note"]) == [f"n{i}" for i in range(12)]
    assert len(fake.requests) == 36
    for row in range(12):
        captions = result[row]["captions"]
        # exactly the backend text, stripped, in type order
        assert [c.split(" ", 1)[1] for c in captions] == prompts_of(labelled, row)
        assert all(c == c.strip() for c in captions)
    summary = result.caption_summary
    assert (summary.requests, summary.cache_hits, summary.captions_done, summary.failures) == (36, 0, 36, [])
    assert summary.usage == {"prompt_tokens": 180, "completion_tokens": 252}
    assert summary.passes == 1 and os.path.exists(tmp_path / CACHE_FILENAME)
    # the captioner got the decoded original image, not a CLIP-transformed one
    sizes = {request.image.size for request in fake.requests}
    assert sizes == {(24 + i, 20 + 2 * i) for i in range(12)}
    provenance = caption_provenance(result)
    assert provenance["captioner"] == fake.cache_identity()
    assert provenance["domain"] == "textures" and provenance["caption_types"] == list(TYPES)
    assert provenance["counts"] == {
        "rows": 12,
        "captions": 36,
        "captions_expected": 36,
        "rows_incomplete": 0,
        "rows_without_captions": 0,
    }
    assert "{class_name}" in provenance["prompt_template"]


def test_rerun_makes_zero_requests_and_returns_cached_text(labelled, tmp_path):
    first = caption_dataset(labelled, FakeCaptioner(), domain="textures", cache_dir=tmp_path, show_progress=False)
    again = FakeCaptioner()
    second = caption_dataset(labelled, again, domain="textures", cache_dir=tmp_path, show_progress=False)
    assert again.requests == []
    assert second.caption_summary.cache_hits == 36 and second.caption_summary.requests == 0
    assert list(second["captions"]) == list(first["captions"])
    # the key includes the captioner identity, the prompt and the image: each change is a miss
    other_model = FakeCaptioner(model="other")
    caption_dataset(labelled, other_model, domain="textures", cache_dir=tmp_path, show_progress=False)
    assert len(other_model.requests) == 36
    other_domain = FakeCaptioner()
    caption_dataset(labelled, other_domain, domain="fabrics", cache_dir=tmp_path, show_progress=False)
    assert len(other_domain.requests) == 36
    # the same file bytes in another dataset object (reloaded from disk) hit the cache
    labelled.save_to_disk(str(tmp_path / "saved"))
    reloaded = FakeCaptioner()
    caption_dataset(
        datasets.load_from_disk(str(tmp_path / "saved")),
        reloaded,
        domain="textures",
        cache_dir=tmp_path,
        show_progress=False,
    )
    assert reloaded.requests == []


def test_more_captions_per_type_reuses_slot_zero(labelled, tmp_path):
    one = caption_dataset(labelled, FakeCaptioner(), domain="textures", cache_dir=tmp_path, show_progress=False)
    fake = FakeCaptioner()
    two = caption_dataset(
        labelled, fake, domain="textures", captions_per_type=2, cache_dir=tmp_path, show_progress=False
    )
    assert len(fake.requests) == 36  # only slot 1 of each (image, type)
    for row in range(12):
        captions = two[row]["captions"]
        assert len(captions) == 6
        assert captions[0::2] == one[row]["captions"]  # type-major: visual 0, visual 1, shape 0, ...
        assert len(set(captions)) == 6  # slot 1 is a distinct caption
        assert [c.split(" ", 1)[1] for c in captions] == [p for p in prompts_of(labelled, row) for _ in range(2)]


def test_partial_failure_then_resume_requests_exactly_the_missing(labelled, tmp_path):
    # rows share prompts with their class mates (row i has class i % 3), so pick the failing ones by image size
    bad = {((28, 28), prompts_of(labelled, 4)[1])} | {((29, 30), prompt) for prompt in prompts_of(labelled, 5)}

    def fail(request, seen):
        width, height = request.image.size
        if width == height >= 224:  # a retry (resized to a square side in [224, 512)) fails again
            return True
        return ((width, height), request.prompt) in bad

    fake = FakeCaptioner(fail=fail)
    with pytest.raises(CaptioningError, match="4 caption.s. still missing.*nothing was written.*allow_missing"):
        caption_dataset(labelled, fake, domain="textures", cache_dir=tmp_path, max_passes=3, show_progress=False)
    assert len(fake.requests) == 36 + 2 * 4
    fake = FakeCaptioner(fail=fail)  # the same failures, kept on request: the rows are returned with what they have
    result = caption_dataset(
        labelled, fake, domain="textures", cache_dir=tmp_path, max_passes=3, show_progress=False, allow_missing=True
    )
    assert len(fake.requests) == 3 * 4  # only the missing ones, in 3 passes  # 4 failing captions, asked in 3 passes
    retried = fake.requests[4:]
    assert all(r.image.size[0] == r.image.size[1] and 224 <= r.image.size[0] < 512 for r in retried)
    failures = [(f.row, f.caption_type, f.slot, f.reason) for f in result.caption_summary.failures]
    assert failures == [
        (4, "shape", 0, "HTTP 500: upstream failure"),
        (5, "visual", 0, "HTTP 500: upstream failure"),
        (5, "shape", 0, "HTTP 500: upstream failure"),
        (5, "texture", 0, "HTTP 500: upstream failure"),
    ]
    assert len(result) == 12  # no row dropped
    assert len(result[4]["captions"]) == 2 and result[5]["captions"] == []
    assert [c.split(" ", 1)[1] for c in result[4]["captions"]] == [prompts_of(labelled, 4)[i] for i in (0, 2)]
    summary = result.caption_summary
    assert (summary.rows_incomplete, summary.rows_without_captions, summary.retries) == (1, 1, 2 * 12)
    assert (summary.cache_hits, summary.requests) == (32, 12)
    assert "rerun" in str(summary).lower() or "again" in str(summary)
    assert caption_provenance(result)["counts"]["rows_without_captions"] == 1

    healed = FakeCaptioner()
    resumed = caption_dataset(labelled, healed, domain="textures", cache_dir=tmp_path, show_progress=False)
    assert len(healed.requests) == 4
    assert sorted(r.prompt for r in healed.requests) == sorted([prompts_of(labelled, 4)[1], *prompts_of(labelled, 5)])
    assert all(len(c) == 3 for c in resumed["captions"])
    assert resumed[0]["captions"] == result[0]["captions"]


def test_transient_failure_recovered_in_second_pass(labelled, tmp_path):
    fake = FakeCaptioner(fail=lambda request, seen: len(seen) <= 5)  # the first 5 requests fail
    result = caption_dataset(labelled, fake, domain="textures", cache_dir=tmp_path, show_progress=False)
    assert len(fake.requests) == 41 and result.caption_summary.passes == 2
    assert result.caption_summary.failures == [] and all(len(c) == 3 for c in result["captions"])


def test_strict_mode_lists_row_type_and_reason(labelled, tmp_path):
    target = prompts_of(labelled, 2)[2]  # texture of row 2's class (rows 2, 5, 8, 11)
    fake = FakeCaptioner(fail=lambda request, seen: request.prompt == target)
    with pytest.raises(CaptioningError) as info:
        caption_dataset(
            labelled, fake, domain="textures", cache_dir=tmp_path, strict=True, max_passes=2, show_progress=False
        )
    message = str(info.value)
    assert "4 caption(s) still missing" in message and "4 × HTTP 500: upstream failure" in message
    assert "\n" not in message  # one line: the CLI prints it as its error
    assert [str(f) for f in info.value.failures] == [
        f"row {row}, caption type 'texture' (slot 0): HTTP 500: upstream failure" for row in (2, 5, 8, 11)
    ]
    # what succeeded was cached: a healthy rerun asks for the 4 missing only
    healed = FakeCaptioner()
    caption_dataset(labelled, healed, domain="textures", cache_dir=tmp_path, strict=True, show_progress=False)
    assert len(healed.requests) == 4


def test_empty_answers_are_failures_never_cached(labelled, tmp_path):
    fake = FakeCaptioner(text=lambda request: "   " if "shape" in request.prompt else "  fine caption \n")
    result = caption_dataset(
        labelled, fake, domain="textures", cache_dir=tmp_path, max_passes=2, show_progress=False, allow_missing=True
    )
    assert all(c == ["fine caption", "fine caption"] for c in result["captions"])
    assert {f.reason for f in result.caption_summary.failures} == {"answer rejected (empty)"}
    assert len(result.caption_summary.failures) == 12
    assert result.caption_summary.rejected == {"empty": 12 * 2}  # asked again in the second pass, counted twice
    with sqlite3.connect(tmp_path / CACHE_FILENAME) as db:
        assert db.execute("SELECT COUNT(*) FROM captions").fetchone()[0] == 24
        assert db.execute("SELECT COUNT(*) FROM captions WHERE trim(text) = ''").fetchone()[0] == 0


def test_authentication_error_propagates_and_keeps_finished_captions(labelled, tmp_path):
    fake = FakeCaptioner(raise_after=5)
    with pytest.raises(PermissionError, match="401"):
        caption_dataset(labelled, fake, domain="textures", cache_dir=tmp_path, show_progress=False)
    assert len(fake.requests) == 5
    resumed = FakeCaptioner()
    caption_dataset(labelled, resumed, domain="textures", cache_dir=tmp_path, show_progress=False)
    assert len(resumed.requests) == 31


def test_labels_class_names_and_bad_input(labelled, tmp_path):
    strings = labelled.cast_column("label", datasets.Value("string")).map(
        lambda row: {"label": ["Banded_Stripes", "002.dotted", "striped"][int(row["label"])]}
    )
    fake = FakeCaptioner()
    caption_dataset(strings, fake, domain="textures", caption_types=["color"], cache_dir=tmp_path, show_progress=False)
    assert {r.prompt.split(" photo")[0] for r in fake.requests} == {
        "To differentiate this banded stripes",
        "To differentiate this dotted",
        "To differentiate this striped",
    }
    ints = labelled.cast_column("label", datasets.Value("int64"))
    with pytest.raises(ValueError, match="class_names"):
        caption_dataset(ints, fake, domain="textures", cache_dir=tmp_path)
    custom = FakeCaptioner()
    caption_dataset(
        ints,
        custom,
        domain="textures",
        caption_types=["shape"],
        class_names=["A", "B", "C"],
        cache_dir=tmp_path,
        show_progress=False,
    )
    assert {r.prompt.split(" photo")[0][-1] for r in custom.requests} == {"a", "b", "c"}
    for wrong in (["A", "B", "C", "D"], ["A", "B"], "ABC"):  # a ClassLabel of 3; a string is not 3 names
        with pytest.raises(ValueError, match="class_names"):
            caption_dataset(labelled, custom, domain="textures", class_names=wrong, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="already has a 'captions' column"):
        caption_dataset(labelled.add_column("captions", [[]] * 12), fake, domain="textures", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="'picture'"):
        caption_dataset(labelled, fake, domain="textures", image_column="picture", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="class_name"):
        caption_dataset(labelled, fake, domain="textures", prompt_template="no field", cache_dir=tmp_path)
    # a spec string (what the CLI and the builder take) is not a captioner: the error says how to build one
    with pytest.raises(TypeError, match=r"captioner 1 is a str, not a Captioner .*make_captioner\('openai:m'\)"):
        caption_dataset(labelled, [fake, "openai:m"], domain="textures", cache_dir=tmp_path)


def test_missing_image_is_reported_not_dropped(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (8, 8), "red"), None, Image.new("RGB", (9, 9), "blue")], "label": [0, 1, 1]},
        features=features,
    )
    fake = FakeCaptioner()
    result = caption_dataset(ds, fake, domain="things", cache_dir=tmp_path, show_progress=False)
    assert len(fake.requests) == 6 and len(result) == 3
    assert result[1]["captions"] == [] and [f.row for f in result.caption_summary.failures] == [1, 1, 1]
    assert result.caption_summary.failures[0].reason.startswith("the image in column 'image' is missing (None); fix")


def test_shard_bounds_match_datasets():
    ds = datasets.Dataset.from_dict({"x": list(range(11))})
    for num_shards in (1, 2, 3, 4, 11):
        for index in range(num_shards):
            start, stop = shard_bounds(11, num_shards, index)
            assert list(ds.shard(num_shards, index, contiguous=True)["x"]) == list(range(start, stop))
    with pytest.raises(ValueError, match="shard_index"):
        shard_bounds(11, 2, 2)


def test_concurrent_shards_share_one_cache_then_merge(labelled, tmp_path):
    results, fakes = {}, {}

    def run(index):
        fakes[index] = FakeCaptioner(delay=0.002)
        results[index] = caption_dataset(
            labelled,
            fakes[index],
            domain="textures",
            cache_dir=tmp_path,
            num_shards=2,
            shard_index=index,
            show_progress=False,
        )

    threads = [threading.Thread(target=run, args=(index,), daemon=True) for index in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)  # bounded: two shards waiting on each other's claims would fail here, not hang the suite
        assert not thread.is_alive(), "a shard never finished"
    assert len(fakes[0].requests) == len(fakes[1].requests) == 18  # 6 rows each, disjoint
    assert caption_provenance(results[1])["shard"] == {"num_shards": 2, "shard_index": 1, "start": 6, "stop": 12}
    merged = merge_caption_shards([results[1], results[0]])  # any order
    assert list(merged["note"]) == [f"n{i}" for i in range(12)]
    assert caption_provenance(merged)["shard"] is None and caption_provenance(merged)["counts"]["captions"] == 36
    # the simplest merge: rerun unsharded, every caption is a cache hit
    again = FakeCaptioner()
    whole = caption_dataset(labelled, again, domain="textures", cache_dir=tmp_path, show_progress=False)
    assert again.requests == [] and list(whole["captions"]) == list(merged["captions"])
    with pytest.raises(ValueError, match="0..1"):
        merge_caption_shards([results[0], results[0]])
    other = caption_dataset(
        labelled,
        FakeCaptioner(),
        domain="fabrics",
        cache_dir=tmp_path,
        num_shards=2,
        shard_index=1,
        show_progress=False,
    )
    with pytest.raises(ValueError, match="domain"):
        merge_caption_shards([results[0], other])


def test_provenance_survives_save_to_disk_and_map(labelled, tmp_path):
    result = caption_dataset(labelled, FakeCaptioner(), domain="textures", cache_dir=tmp_path, show_progress=False)
    result.save_to_disk(str(tmp_path / "out"))
    loaded = datasets.load_from_disk(str(tmp_path / "out"))
    assert caption_provenance(loaded) == caption_provenance(result)
    assert caption_provenance(loaded.map(lambda row: row)) == caption_provenance(result)
    assert caption_provenance(labelled) is None


def _count_cached(path):
    if not os.path.exists(path):
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM captions").fetchone()[0]
    except sqlite3.OperationalError:  # the table is not created yet
        return 0


def _save_worker_dataset(path, rows=8):
    """Saves `rows` small distinct images of two classes ("a_b", "c") for tests/scripts/caption_worker.py."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a_b", "c"])})
    images = [Image.new("RGB", (16 + i, 16), (30 * i % 256, 10, 200 - 20 * i % 200)) for i in range(rows)]
    labels = [i % 2 for i in range(rows)]
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(str(path))


def _start_worker(*args):
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(root / "tests/scripts/caption_worker.py"), *map(str, args)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_sigkill_mid_run_then_resume_loses_nothing(tmp_path):
    from mmft_hf.captioning.captioners.openai_compatible import OpenAICompatibleCaptioner

    _save_worker_dataset(tmp_path / "ds")
    server = start_fake_api(delay=0.25)
    cache_file = tmp_path / "cache" / CACHE_FILENAME
    worker = _start_worker(tmp_path / "ds", tmp_path / "cache", server.base_url)
    try:
        deadline = time.monotonic() + 120
        while _count_cached(cache_file) < 5:
            assert worker.poll() is None, worker.stdout.read().decode()
            assert time.monotonic() < deadline, "the worker made no progress"
            time.sleep(0.02)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    stored = _count_cached(cache_file)
    # a request sent just before the kill may be recorded a moment later: count once none has arrived for longer
    # than the server takes to answer one
    first_run_requests = wait_until_quiet(server, quiet=0.5)
    assert 5 <= stored < 24, "the kill must land mid-run"
    assert first_run_requests >= stored

    captioner = OpenAICompatibleCaptioner(
        model="fake-mllm", base_url=server.base_url, api_key_env=None, max_concurrency=8, max_retries=0
    )
    try:
        result = caption_dataset(
            datasets.load_from_disk(str(tmp_path / "ds")),
            captioner,
            domain="textures",
            cache_dir=tmp_path / "cache",
            show_progress=False,
        )
        second_run_requests = len(server.requests) - first_run_requests
    finally:
        server.shutdown()
        server.server_close()
    # no stored caption was requested again: the resume asks exactly for the captions missing from the cache (the
    # killed run's claims on the others ended with its process), and the total is every caption once plus the
    # requests that were in flight (or unstored) at the kill
    assert second_run_requests == 24 - stored == result.caption_summary.requests
    assert len(server.requests) == 24 + (first_run_requests - stored)
    assert result.caption_summary.cache_hits == stored and result.caption_summary.failures == []
    names = ["a b", "c"]
    for row in range(8):
        assert result[row]["captions"] == [build_prompt(names[row % 2], "textures", kind) for kind in TYPES]
    assert _count_cached(cache_file) == 24


def test_real_backend_authentication_error_stops_the_run(labelled, tmp_path):
    from mmft_hf.captioning.captioners.openai_compatible import CaptionerAuthenticationError, OpenAICompatibleCaptioner

    server = start_fake_api(plan=[(401, {})] * 40)
    try:
        captioner = OpenAICompatibleCaptioner(model="m", base_url=server.base_url, api_key_env=None, max_concurrency=1)
        with pytest.raises(CaptionerAuthenticationError):
            caption_dataset(labelled, captioner, domain="textures", cache_dir=tmp_path, show_progress=False)
        # stopped at once: not retried and not continued over the other captions (the backend may have started one
        # more request before the cancellation reached it)
        assert 1 <= len(server.requests) <= 2
    finally:
        server.shutdown()
        server.server_close()


def test_the_summary_counts_every_rejected_answer_also_those_the_captioner_asked_again(labelled, tmp_path):
    # default max_answer_retries=2: the captioner re-asks a refusal and a cut answer itself; both were billed, so the
    # summary counts them, beside the requests and the retries they cost
    from mmft_hf.captioning.captioners.openai_compatible import OpenAICompatibleCaptioner
    from tests.fake_chat_server import REFUSAL, answer

    server = start_fake_api(plan=[(200, {}), answer(REFUSAL), answer("A cut", finish_reason="length")])
    try:
        captioner = OpenAICompatibleCaptioner(model="m", base_url=server.base_url, api_key_env=None, max_concurrency=1)
        result = caption_dataset(
            labelled.select(range(2)), captioner, domain="textures", cache_dir=tmp_path, show_progress=False
        )
    finally:
        server.shutdown()
        server.server_close()
    summary = result.caption_summary
    assert len(server.requests) == 8 and summary.captions_done == 6 and summary.failures == []
    assert summary.requests == 6 and summary.retries == 2
    assert summary.rejected == {"refusal": 1, "finish_reason=length": 1}
    assert "sorry" not in str(result["captions"]) and "A cut" not in str(result["captions"])


def test_cache_open_retries_while_another_shard_holds_the_lock(tmp_path, monkeypatch):
    """Two shards opening one fresh cache at once: switching to WAL can fail at once with "database is locked"."""
    import sqlite3

    from mmft_hf.captioning import cache as caption_cache

    real_connect, refusals = sqlite3.connect, []

    class BusyAtFirst:
        def __init__(self, *args, **kwargs):
            self._connection = real_connect(*args, **kwargs)

        def execute(self, statement, *args):
            if statement.startswith("PRAGMA journal_mode") and len(refusals) < 2:
                refusals.append(statement)
                raise sqlite3.OperationalError("database is locked")
            return self._connection.execute(statement, *args)

        def close(self):
            self._connection.close()

    monkeypatch.setattr(caption_cache.sqlite3, "connect", BusyAtFirst)
    cache = caption_cache.CaptionCache(str(tmp_path), timeout=5.0)
    cache.put("k", "a caption", image_sha256="s", prompt="p", identity="i", slot=0)
    assert len(refusals) == 2 and cache.get_many(["k"]) == {"k": "a caption"}
    cache.close()
    monkeypatch.undo()
    with pytest.raises(sqlite3.DatabaseError, match="not a database"):
        (tmp_path / "bad.sqlite").write_bytes(b"not a database at all" * 100)
        caption_cache.CaptionCache(str(tmp_path / "bad.sqlite"), timeout=0.1)  # other errors are not retried


def test_unreadable_image_is_a_reported_failure_and_the_rest_is_captioned(labelled, tmp_path):
    truncated = tmp_path / "truncated.png"
    full = tmp_path / "full.png"
    Image.new("RGB", (40, 40), (200, 10, 10)).save(full)
    truncated.write_bytes(full.read_bytes()[:60])  # a valid PNG header, then nothing
    rows = labelled.cast_column("image", datasets.Image(decode=False)).to_dict()
    rows["image"][3] = {"bytes": None, "path": str(truncated)}
    broken = datasets.Dataset.from_dict(rows, features=labelled.features)
    fake = FakeCaptioner()
    result = caption_dataset(broken, fake, domain="textures", cache_dir=tmp_path / "cache", show_progress=False)
    assert len(fake.requests) == 33  # 11 readable rows x 3 types; row 3 never sent, not retried
    failures = result.caption_summary.failures
    assert [(f.row, f.caption_type) for f in failures] == [(3, "visual"), (3, "shape"), (3, "texture")]
    assert all("cannot be read" in f.reason for f in failures)
    captions = list(result["captions"])  # reading the column does not decode the (broken) images
    assert len(captions) == 12 and captions[3] == [] and all(len(captions[i]) == 3 for i in (2, 4))


def test_cache_claims_are_exclusive_leases(tmp_path):
    import socket

    from mmft_hf.captioning.cache import CaptionCache, ClaimKeeper, new_claim_owner

    first, second = CaptionCache(str(tmp_path)), CaptionCache(str(tmp_path))  # two connections, as two runs
    me, other = new_claim_owner(), new_claim_owner()
    assert me != other
    assert first.claim(["a", "b", "c"], me, ttl_s=60) == {"a", "b", "c"}
    assert second.claim(["a", "b", "d"], other, ttl_s=60) == {"d"}  # a and b are held by a live owner
    assert first.claim(["a", "d"], me, ttl_s=60) == {"a"}  # its own lease renews; d is the other's
    first.put("a", "a caption", image_sha256="s", prompt="p", identity="i", slot=0)
    assert second.claim(["a"], other, ttl_s=60) == set()  # stored: nobody requests it again
    first.release(me, ["b"])
    assert second.claim(["b", "c"], other, ttl_s=60) == {"b"}
    first.release(me)  # all of its leases
    assert second.claim(["c"], other, ttl_s=60) == {"c"}

    # an expired lease is free; renew keeps a live one
    assert first.claim(["e", "f"], "elsewhere:1:x", ttl_s=0.3) == {"e", "f"}
    assert first.renew("elsewhere:1:x", ttl_s=60) == 2
    time.sleep(0.4)
    assert second.claim(["e"], other, ttl_s=60) == set()
    assert first.claim(["g"], "elsewhere:1:x", ttl_s=0.2) == {"g"}
    time.sleep(0.3)
    assert second.claim(["g"], other, ttl_s=60) == {"g"}

    # a process of this machine that no longer exists (killed with SIGKILL) loses its leases at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    assert first.claim(["h"], f"{host}:{dead.pid}:x", ttl_s=600) == {"h"}
    assert second.claim(["h"], other, ttl_s=60) == {"h"}
    # ... while one of another machine keeps them until they expire (its process id means nothing here)
    assert first.claim(["i"], f"not-{host}:{dead.pid}:x", ttl_s=600) == {"i"}
    assert second.claim(["i"], other, ttl_s=60) == set()

    # a live run's keeper renews its leases (seen in the table: no assumption on how fast its thread runs), and
    # releases them when the run ends
    def expires(key):
        return first._connection.execute("SELECT expires FROM claims WHERE key = ?", (key,)).fetchone()[0]

    with ClaimKeeper(str(tmp_path), "keeper:1:x", ttl_s=0.3):
        assert first.claim(["j"], "keeper:1:x", ttl_s=0.3) == {"j"}
        claimed, deadline = expires("j"), time.monotonic() + 60
        while expires("j") <= claimed:
            assert time.monotonic() < deadline, "the keeper never renewed the lease"
            time.sleep(0.02)
    assert second.claim(["j"], other, ttl_s=60) == {"j"}
    first.close()
    second.close()


def test_corrupt_cache_file_names_its_path_and_the_fix(tmp_path):
    from mmft_hf.captioning.cache import CaptionCache

    path = tmp_path / "captions.sqlite"
    path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(sqlite3.DatabaseError) as info:
        CaptionCache(str(tmp_path), timeout=0.1)
    assert str(path) in str(info.value) and f"mv '{path}' '{path}.broken'" in str(info.value)

    # damage found only when a page is read, after the file opened fine
    damaged = tmp_path / "damaged.sqlite"
    with CaptionCache(str(damaged)) as cache:
        for index in range(400):
            cache.put(f"k{index}", "a caption " * 20, image_sha256="s", prompt="p", identity="i", slot=0)
    data = bytearray(damaged.read_bytes())  # the WAL was checkpointed into the file on close
    data[4096 * 2 : 4096 * 8] = b"\xff" * (4096 * 6)
    damaged.write_bytes(bytes(data))
    cache = CaptionCache(str(damaged), timeout=0.1)
    with pytest.raises(sqlite3.DatabaseError) as info:
        cache.get_many(f"k{index}" for index in range(400))
    cache.close()
    assert str(damaged) in str(info.value) and f"mv '{damaged}' '{damaged}.broken'" in str(info.value)


def _count_claims(path):
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM claims").fetchone()[0]
    except sqlite3.OperationalError:  # no file or table yet
        return 0


def test_two_runs_sharing_a_cache_pay_for_each_caption_once(tmp_path):
    """A worker process and this test process caption the same data into one cache at once: every caption is
    requested once, and both end with the complete dataset."""
    from mmft_hf.captioning.captioners.openai_compatible import OpenAICompatibleCaptioner

    _save_worker_dataset(tmp_path / "ds")
    server = start_fake_api(delay=0.3)  # 24 captions, 2 at a time: ~3.6 s of requests for one run
    worker = _start_worker(tmp_path / "ds", tmp_path / "cache", server.base_url, "--output", tmp_path / "out")
    try:
        deadline = time.monotonic() + 120
        while not _count_claims(tmp_path / "cache" / CACHE_FILENAME):  # the worker is requesting captions
            assert worker.poll() is None, worker.stdout.read().decode()
            assert time.monotonic() < deadline, "the worker made no progress"
            time.sleep(0.02)
        captioner = OpenAICompatibleCaptioner(
            model="fake-mllm", base_url=server.base_url, api_key_env=None, max_concurrency=2, max_retries=0
        )
        here = caption_dataset(
            datasets.load_from_disk(str(tmp_path / "ds")),
            captioner,
            domain="textures",
            cache_dir=tmp_path / "cache",
            show_progress=False,
        )
        output = worker.communicate(timeout=120)[0].decode()
        assert worker.returncode == 0, output
        total = wait_until_quiet(server, quiet=0.3)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        server.shutdown()
        server.server_close()
    assert total == 24  # 8 images x 3 caption types, each paid once
    summary = here.caption_summary
    worker_requests = int(re.search(r"(\d+) requests in", output).group(1))
    assert worker_requests + summary.requests == 24
    assert summary.from_other_runs > 0  # it waited for captions the worker had claimed, then read them
    assert summary.cache_hits + summary.from_other_runs + summary.requests == 24 and summary.failures == []
    names = ["a b", "c"]
    for result in (here, datasets.load_from_disk(str(tmp_path / "out"))):
        for row in range(8):
            assert result[row]["captions"] == [build_prompt(names[row % 2], "textures", kind) for kind in TYPES]


def test_unreachable_server_raises_with_how_to_resume(labelled, tmp_path):
    import socket

    from mmft_hf.captioning.captioners import CaptionerConnectionError, OpenAICompatibleCaptioner

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        base_url = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    captioner = OpenAICompatibleCaptioner("fake-mllm", base_url=base_url, api_key_env=None, max_retries=0)
    with pytest.raises(CaptionerConnectionError) as info:  # raised, never a dataset of empty caption lists
        caption_dataset(labelled, captioner, domain="textures", cache_dir=tmp_path, show_progress=False)
    message = str(info.value)
    assert f"Cannot connect to {base_url}" in message
    assert f"0 of 36 captions are cached in {tmp_path / CACHE_FILENAME}" in message
    assert "run the same command again to resume" in message and "\n" not in message  # one line


def test_server_that_stops_answering_trips_the_breaker_and_the_rerun_resumes(labelled, tmp_path):
    from mmft_hf.captioning.captioners import CaptionerConnectionError, OpenAICompatibleCaptioner

    stall = (200, {"X-Delay": "1.0"})
    server = start_fake_api(plan=[(200, {})] * 5 + [stall] * 3)
    try:
        captioner = OpenAICompatibleCaptioner(
            "fake-mllm", base_url=server.base_url, api_key_env=None, max_retries=0, timeout=0.3, max_concurrency=1
        )
        with pytest.raises(CaptionerConnectionError, match="3 consecutive requests") as info:
            caption_dataset(labelled, captioner, domain="textures", cache_dir=tmp_path, show_progress=False)
        assert "5 of 36 captions are cached" in str(info.value)
        assert wait_until_quiet(server, quiet=0.3) == 8  # stopped after the third failure in a row
        healthy = OpenAICompatibleCaptioner("fake-mllm", base_url=server.base_url, api_key_env=None)
        result = caption_dataset(labelled, healthy, domain="textures", cache_dir=tmp_path, show_progress=False)
    finally:
        server.shutdown()
        server.server_close()
    assert (result.caption_summary.cache_hits, result.caption_summary.requests) == (5, 31)


def test_caption_types_with_commas_are_rejected_before_any_request(labelled, tmp_path):
    fake = FakeCaptioner()
    for bad, message in (
        (["shape,texture"], "give each characteristic separately"),
        (["shape", ""], "Invalid caption type ''"),
        (["shape", "shape"], "duplicates"),
    ):
        with pytest.raises(ValueError, match=message):
            caption_dataset(labelled, fake, domain="textures", caption_types=bad, cache_dir=tmp_path)
    assert fake.requests == []


def test_ctrl_c_says_what_is_cached_and_how_to_resume(labelled, tmp_path):
    class InterruptedAfter(FakeCaptioner):
        def caption(self, requests):
            for number, item in enumerate(super().caption(requests)):
                if number == 5:
                    raise KeyboardInterrupt
                yield item

    with pytest.raises(KeyboardInterrupt) as info:  # still a KeyboardInterrupt, for notebooks and scripts
        caption_dataset(labelled, InterruptedAfter(), domain="textures", cache_dir=tmp_path, show_progress=False)
    assert isinstance(info.value, CaptioningInterrupted)
    assert str(info.value) == (
        f"Interrupted. 5 of 36 captions are cached in {tmp_path / CACHE_FILENAME}; run the same command again to "
        "resume (only the missing captions are requested)."
    )
    resumed = FakeCaptioner()
    caption_dataset(labelled, resumed, domain="textures", cache_dir=tmp_path, show_progress=False)
    assert len(resumed.requests) == 31


def test_ctrl_c_before_any_request_says_nothing_was_requested(labelled, tmp_path, monkeypatch):
    from mmft_hf.captioning.cache import CaptionCache

    def interrupted(self, keys):
        raise KeyboardInterrupt

    monkeypatch.setattr(CaptionCache, "get_many", interrupted)
    with pytest.raises(CaptioningInterrupted, match=r"^Interrupted\. Nothing was requested; the caption cache is "):
        caption_dataset(labelled, FakeCaptioner(), domain="textures", cache_dir=tmp_path, show_progress=False)


def test_the_summary_counts_only_requests_the_server_answered(labelled, tmp_path):
    # a request that timed out before any HTTP response was never processed (nor billed): it is no request in the
    # summary, which reports it apart; asked again (in the next pass, or by the captioner's retry) it is counted once
    from mmft_hf.captioning.captioners.openai_compatible import OpenAICompatibleCaptioner
    from tests.fake_chat_server import HANG

    for max_retries, cache in ((0, "next-pass"), (1, "retried")):
        server = start_fake_api(plan=[(200, {}), HANG])  # the second request hangs; the rest are answered
        try:
            captioner = OpenAICompatibleCaptioner(
                model="m", base_url=server.base_url, api_key_env=None, max_concurrency=1, max_retries=max_retries,
                timeout=0.5,
            )  # fmt: skip
            result = caption_dataset(
                labelled.select(range(2)), captioner, domain="textures", cache_dir=tmp_path / cache,
                show_progress=False,
            )  # fmt: skip
        finally:
            server.shutdown()
            server.server_close()
        summary = result.caption_summary
        assert len(server.requests) == 7 and summary.captions_done == 6 and summary.failures == []
        assert (summary.requests, summary.retries) == (6, 0)  # the answered requests, and no answered retry
        assert summary.unanswered == 1
        assert summary.passes == (2 if max_retries == 0 else 1)
        assert "6 requests" in str(summary) and "1 attempt(s) got no answer" in str(summary)


def test_a_cut_answer_is_asked_again_with_a_raised_token_limit(labelled, tmp_path):
    # the loopback server cuts an answer at `max_tokens` words (finish_reason "length"), as a real one does; the
    # prompt it echoes is 22 words. At the same limit a cut answer would be cut, and paid, again: it is asked again
    # with the limit doubled, by the captioner's own re-ask and by the engine's next pass alike
    from mmft_hf.captioning.captioners.openai_compatible import OpenAICompatibleCaptioner

    rows = labelled.select(range(2))
    for answer_retries, passes in ((2, 1), (0, 2)):
        server = start_fake_api()
        try:
            captioner = OpenAICompatibleCaptioner(
                model="m", base_url=server.base_url, api_key_env=None, max_concurrency=1, max_tokens=12,
                max_answer_retries=answer_retries,
            )  # fmt: skip
            result = caption_dataset(
                rows, captioner, domain="textures", cache_dir=tmp_path / str(passes), show_progress=False
            )
        finally:
            server.shutdown()
            server.server_close()
        assert sorted(body["max_tokens"] for *_, body in server.requests) == [12] * 6 + [24] * 6
        assert [result[row]["captions"] for row in (0, 1)] == [
            [build_prompt(rows.features["label"].names[rows[row]["label"]], "textures", t) for t in TYPES]
            for row in (0, 1)
        ]  # whole captions, none cut
        summary = result.caption_summary
        assert summary.passes == passes and summary.cut == 6 and summary.rejected == {"finish_reason=length": 6}
        assert "6 answer(s) cut by the token limit" in str(summary) and "--max_tokens" in str(summary)


def test_a_raised_token_limit_stops_at_four_times_max_tokens(labelled, tmp_path):
    # an answer that needs more than 4 x max_tokens is cut at every limit: the limit grows 4 -> 8 -> 16 and no
    # further, and the run stops saying to raise --max_tokens
    from mmft_hf.captioning.captioners.openai_compatible import OpenAICompatibleCaptioner

    server = start_fake_api()
    try:
        captioner = OpenAICompatibleCaptioner(model="m", base_url=server.base_url, api_key_env=None, max_tokens=4)
        with pytest.raises(CaptioningError, match=r"cut by the token limit.*--max_tokens") as info:
            caption_dataset(
                labelled.select(range(1)), captioner, domain="textures", caption_types=("visual",),
                cache_dir=tmp_path, max_passes=2, show_progress=False,
            )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    assert [body["max_tokens"] for *_, body in server.requests] == [4, 8, 16, 16, 16, 16]
    assert info.value.summary.cut == 6
