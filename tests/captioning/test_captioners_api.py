"""OpenAICompatibleCaptioner against a real HTTP server on 127.0.0.1: retries, failures, concurrency, secrecy."""

import asyncio
import base64
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_chat_server import (
    HANG,
    HUGE,
    RATE_LIMITED,
    REFUSAL,
    answer,
    chat_completion,
    start_fake_api,
    stops_answering_after,
    wait_until_quiet,
)
from PIL import Image

from mmft_hf.captioning.captioners import (
    CaptionerAuthenticationError,
    CaptionerConnectionError,
    CaptionerModelNotFoundError,
    CaptionerNotAnsweringError,
    CaptionerServerError,
    CaptionerUnavailableError,
    CaptionRequest,
    OpenAICompatibleCaptioner,
    openai_compatible,
)

SECRET = "sk-test-DO-NOT-LEAK-8f3a2c"
FAST = {"retry-after-ms": "10"}  # keeps SDK retries quick where the backoff itself is not under test


def completion(content="", finish_reason="stop", refusal=None):
    """An unusable answer as the server sends it; billed as 5 prompt tokens and no answer tokens."""
    return chat_completion(content, finish_reason, refusal, completion_tokens=0)


@pytest.fixture
def api(monkeypatch):
    """Starts fake servers on demand (`api(delay, plan)`) and always stops them."""
    monkeypatch.setenv("MMFT_TEST_KEY", SECRET)
    servers = []

    def start(delay=0.0, plan=(), default=(200, {})):
        servers.append(start_fake_api(delay=delay, plan=plan, default=default))
        return servers[-1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def make_captioner(server, **kwargs):
    kwargs = {"api_key_env": "MMFT_TEST_KEY", "max_retries": 2, "timeout": 5.0, **kwargs}
    return OpenAICompatibleCaptioner("fake-vlm", base_url=server.base_url, **kwargs)


def make_requests(count, size=(40, 30)):
    return [CaptionRequest(Image.new("RGB", size, (10 * i, 100, 50)), f"describe image {i}") for i in range(count)]


def header(request, name):
    _, headers, _ = request
    return {key.lower(): value for key, value in headers.items()}[name.lower()]


def user_parts(body):
    (message,) = body["messages"]
    return {part["type"]: part for part in message["content"]}


def test_success_echoes_prompt_with_usage_and_settings(api):
    server = api()
    captioner = make_captioner(server, temperature=0.3, max_tokens=77, extra_body={"top_k": 5})
    results = dict(captioner.caption(make_requests(3)))
    assert len(server.requests) == 3
    assert {i: r.text for i, r in results.items()} == {i: f"describe image {i}" for i in range(3)}
    for result in results.values():
        assert result.error is None and result.retries == 0
        assert result.usage == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    for request in server.requests:
        body = request[2]
        assert header(request, "Authorization") == f"Bearer {SECRET}"
        assert body["model"] == "fake-vlm" and body["temperature"] == 0.3 and body["max_tokens"] == 77
        assert body["top_k"] == 5  # extra_body is merged into the request
    prompts = sorted(user_parts(body)["text"]["text"] for _, _, body in server.requests)
    assert prompts == [f"describe image {i}" for i in range(3)]


@pytest.mark.parametrize(("image_format", "mime"), [("JPEG", "image/jpeg"), ("PNG", "image/png")])
def test_image_arrives_as_bounded_rgb_data_url(api, monkeypatch, image_format, mime):
    prepared, prepare_image = [], openai_compatible.prepare_image

    def counting_prepare_image(image, max_image_side):
        prepared.append(image)
        return prepare_image(image, max_image_side)

    monkeypatch.setattr(openai_compatible, "prepare_image", counting_prepare_image)
    server = api()
    captioner = make_captioner(server, max_image_side=64, image_format=image_format)
    big = Image.new("RGBA", (1000, 500), (0, 0, 255, 255))
    small = Image.new("L", (20, 10), 128)
    requests = [CaptionRequest(big, "visual"), CaptionRequest(big, "shape"), CaptionRequest(small, "texture")]
    assert len(dict(captioner.caption(requests))) == 3
    urls = {
        user_parts(body)["text"]["text"]: user_parts(body)["image_url"]["image_url"]["url"]
        for *_, body in server.requests
    }
    assert urls["visual"] == urls["shape"]  # one image sent with both prompts...
    assert len(prepared) == 2 and {id(image) for image in prepared} == {id(big), id(small)}  # ...encoded once
    for prompt, size in (("visual", (64, 32)), ("texture", (20, 10))):  # downscaled; never upscaled
        header, payload = urls[prompt].split(",", 1)
        assert header == f"data:{mime};base64"
        decoded = Image.open(io.BytesIO(base64.b64decode(payload)))
        assert decoded.format == image_format and decoded.size == size and decoded.mode == "RGB"
    assert big.size == (1000, 500) and big.mode == "RGBA"  # the caller's image is untouched


def test_429_honours_retry_after(api):
    server = api(plan=[(429, {"Retry-After": "0.2"})])
    ((index, result),) = list(make_captioner(server).caption(make_requests(1)))
    assert index == 0 and result.text == "describe image 0" and result.retries == 1
    assert len(server.requests) == 2
    gap = server.requests[1][0] - server.requests[0][0]
    assert gap >= 0.18  # waited as told (no upper bound: the machine may be slow)


def test_500_then_success_with_default_backoff(api):
    server = api(plan=[(500, {})])
    ((_, result),) = list(make_captioner(server).caption(make_requests(1)))
    assert result.text == "describe image 0" and result.retries == 1 and len(server.requests) == 2
    assert result.rejected == []  # a transport retry is no rejected answer


def test_5xx_until_retries_run_out_is_a_failed_request(api):
    server = api(plan=[(503, FAST), (503, FAST), (503, FAST)])
    ((_, result),) = list(make_captioner(server, max_retries=2).caption(make_requests(1)))
    assert result.text is None and result.error.startswith("HTTP 503") and result.retries == 2
    assert len(server.requests) == 3


def test_slow_response_past_timeout_is_retried(api):
    server = api(plan=[(200, {"X-Delay": "2.0"})])  # the retry must finish within the timeout on a loaded machine
    captioner = make_captioner(server, timeout=0.8, max_retries=1)
    ((_, result),) = list(captioner.caption(make_requests(1)))
    assert result.text == "describe image 0" and result.retries == 1 and len(server.requests) == 2
    assert result.rejected == []  # a transport retry is no rejected answer


def test_timeouts_until_retries_run_out(api):
    server = api(plan=[(200, {}), (200, {"X-Delay": "0.6"}), (200, {"X-Delay": "0.6"})])
    captioner = make_captioner(server, timeout=0.2, max_retries=1, max_concurrency=1)
    results = dict(captioner.caption(make_requests(2)))  # the server answered the first: the second just fails
    assert results[0].text and results[1].text is None and "timed out" in results[1].error
    assert results[1].retries == 1 and len(server.requests) == 3


@pytest.mark.parametrize(
    ("body", "message"),
    [(b"{this is not json", "not valid JSON"), ({"id": "x", "object": "chat.completion"}, "no 'choices'")],
)
def test_malformed_response_fails_the_request_without_retry(api, body, message):
    server = api(plan=[(200, {}, body)])
    results = dict(make_captioner(server, max_concurrency=1).caption(make_requests(2)))
    assert results[0].text is None and "malformed response" in results[0].error and message in results[0].error
    assert results[1].text == "describe image 1"  # the next request is unaffected
    assert len(server.requests) == 2


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (completion(""), "rejected: empty"),
        (completion("  \n "), "rejected: empty"),
        (completion("<think>only thoughts</think>"), "rejected: empty"),
        (completion("A cat.", finish_reason="content_filter"), "rejected: finish_reason=content_filter"),
        (completion("A cat with", finish_reason="length"), "rejected: finish_reason=length"),
        (completion(None, refusal="I cannot help with that."), "rejected: refusal: I cannot help"),
        (completion(REFUSAL), "rejected: refusal: I'm sorry, but I can't help"),
        (completion(HUGE), "rejected: too long: 119999 characters"),
        (completion("fur " * 101), "rejected: too long: 101 words for ~20 asked"),  # the prompt asks 20 words
    ],
)
def test_unusable_answers_are_asked_again_then_failed(api, answer, error):
    server = api(plan=[(200, {}, answer)] * 3)
    request = CaptionRequest(Image.new("RGB", (40, 30)), "Describe this photo in 20 words.")
    ((_, result),) = list(make_captioner(server, max_answer_retries=2).caption([request]))
    assert result.text is None and result.error.startswith(error) and result.retries == 2
    # the two answers asked again (each billed, for the summary to count); the third one's reason is `error`
    assert len(result.rejected) == 2 and all(f"rejected: {reason}".startswith(error) for reason in result.rejected)
    assert result.finish_reason == answer["choices"][0]["finish_reason"]
    assert result.refusal == answer["choices"][0]["message"].get("refusal")
    assert result.usage["prompt_tokens"] == 15  # every attempt is paid for: 3 x 5
    assert len(server.requests) == 3


def test_empty_answer_then_success(api):
    server = api(plan=[(200, {}, completion(""))])
    ((_, result),) = list(make_captioner(server, max_answer_retries=2).caption(make_requests(1)))
    assert result.text == "describe image 0" and result.retries == 1 and len(server.requests) == 2
    assert result.rejected == ["empty"]  # the answer asked again, for the summary to count
    assert result.usage == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}


def test_think_blocks_are_stripped(api):
    server = api(plan=[(200, {}, completion("<think>\nfur? ears?\n</think>\n\n A small cat. "))])
    ((_, result),) = list(make_captioner(server).caption(make_requests(1)))
    assert result.text == "A small cat."


@pytest.mark.parametrize("status", [401, 403])
def test_auth_errors_stop_the_run_at_once(api, status):
    server = api(plan=[(status, {})] * 5)
    captioner = make_captioner(server, max_concurrency=1, max_retries=3)
    with pytest.raises(CaptionerAuthenticationError, match="MMFT_TEST_KEY") as info:
        list(captioner.caption(make_requests(5)))
    assert len(server.requests) == 1  # not retried, and the other four were never sent
    assert SECRET not in str(info.value)


def test_other_client_errors_fail_only_their_request(api):
    server = api(plan=[(400, {})])
    results = dict(make_captioner(server, max_concurrency=1).caption(make_requests(2)))
    assert results[0].text is None and results[0].error.startswith("HTTP 400") and results[0].retries == 0
    assert results[1].text == "describe image 1" and len(server.requests) == 2


def free_port():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_server_stops_the_run_at_once(monkeypatch):
    monkeypatch.setenv("MMFT_TEST_KEY", SECRET)
    base_url = f"http://127.0.0.1:{free_port()}/v1"
    captioner = OpenAICompatibleCaptioner("fake-vlm", base_url=base_url, api_key_env="MMFT_TEST_KEY")  # 5 retries
    with pytest.raises(CaptionerConnectionError, match=f"Cannot connect to {base_url}") as info:
        list(captioner.caption(make_requests(40)))
    # the first request, alone, with 2 retries (not 5) stops the run: not 40 requests, nor the 15 s of 5 retries
    assert isinstance(info.value, CaptionerUnavailableError) and "after 2 retries" in str(info.value)


def test_only_the_first_request_has_fewer_retries(api):
    server = api(plan=[(503, FAST)] * 3 + [(200, {})] + [(503, FAST)] * 4)
    captioner = make_captioner(server, max_retries=4, max_concurrency=1)
    (first,) = [result for _, result in captioner.caption(make_requests(1))]
    assert first.text is None and first.retries == 2 and len(server.requests) == 3
    (second,) = [result for _, result in captioner.caption(make_requests(1))]  # answered by the 4th request
    (third,) = [result for _, result in captioner.caption(make_requests(1))]
    assert second.text and third.text and third.retries == 4 and len(server.requests) == 9


def test_first_request_is_awaited_alone(api):
    server = api(plan=[(200, {"X-Delay": "0.3"})])
    captioner = make_captioner(server, max_concurrency=4)
    results = dict(captioner.caption(make_requests(4)))
    assert len(results) == 4 and all(result.text for result in results.values())
    arrivals = [arrived for arrived, *_ in server.requests]
    assert min(arrivals[1:]) - arrivals[0] >= 0.3  # the others waited for the first answer
    # once the server has answered, the same captioner sends its next requests together
    server.plan[:] = [(200, {"X-Delay": "0.5"})] * 4
    list(captioner.caption(make_requests(4)))
    arrivals = [arrived for arrived, *_ in server.requests[4:]]
    assert len(arrivals) == 4 and max(arrivals) - min(arrivals) < 0.4


def test_model_not_found_stops_the_run_at_once(api):
    server = api(plan=[(404, {}, {"error": {"message": "The model `fake-vlm` does not exist."}})] * 5)
    with pytest.raises(CaptionerModelNotFoundError, match=r"Model 'fake-vlm' not found \(HTTP 404\)") as info:
        list(make_captioner(server, max_concurrency=4).caption(make_requests(5)))
    assert server.base_url in str(info.value) and "does not exist" in str(info.value)
    assert len(server.requests) == 1  # awaited alone, not retried


def test_circuit_breaker_after_consecutive_timeouts(api):
    stall = (200, {"X-Delay": "1.0"})
    # one answer, then the server stalls or is unavailable (503): the third failure in a row stops the run
    server = api(plan=[(200, {}), stall, (503, {}), stall, stall, stall])
    captioner = make_captioner(server, max_concurrency=1, max_retries=0, timeout=0.25)
    seen = []
    with pytest.raises(CaptionerConnectionError, match="3 consecutive requests") as info:
        for _, result in captioner.caption(make_requests(10)):
            seen.append(result)
    assert server.base_url in str(info.value) and "stopped answering" in str(info.value)
    assert isinstance(info.value, CaptionerNotAnsweringError)
    assert [bool(result.text) for result in seen] == [True, False, False]  # the failures before it are reported
    assert wait_until_quiet(server, quiet=0.3) == 4


def test_circuit_breaker_counts_only_consecutive_failures(api):
    stall = (200, {"X-Delay": "1.0"})
    # an answer, even an HTTP error like 400, shows the server is there: the count starts again
    server = api(plan=[(200, {}), stall, stall, (200, {}), stall, stall, (400, {}), stall, stall, (200, {})])
    captioner = make_captioner(server, max_concurrency=1, max_retries=0, timeout=0.25)
    results = [result for _, result in captioner.caption(make_requests(10))]
    assert [bool(result.text) for result in results] == [True, False, False, True] + [False] * 5 + [True]
    with pytest.raises(ValueError, match="max_consecutive_connection_errors"):
        make_captioner(server, max_consecutive_connection_errors=0)


def test_unreadable_image_fails_only_its_request(api):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="PNG")
    truncated = Image.open(io.BytesIO(buffer.getvalue()[:60]))  # header parses; pixel data is cut off
    server = api()
    requests = [CaptionRequest(truncated, "broken"), *make_requests(1)]
    results = dict(make_captioner(server).caption(requests))
    assert results[0].text is None and results[0].error.startswith("could not prepare the image")
    assert results[1].text == "describe image 0" and len(server.requests) == 1


def test_empty_and_invalid_request_lists(api):
    server = api()
    captioner = make_captioner(server)
    assert list(captioner.caption([])) == []
    with pytest.raises(TypeError, match=r"requests\[1\] is a tuple"):
        list(captioner.caption([*make_requests(1), (Image.new("RGB", (4, 4)), "prompt")]))
    assert server.requests == []


def test_requests_overlap_up_to_max_concurrency(api):
    server = api(delay=0.1)
    results = list(make_captioner(server, max_concurrency=4).caption(make_requests(12)))
    assert sorted(index for index, _ in results) == list(range(12))
    assert all(result.text == f"describe image {index}" for index, result in results)
    assert len(server.requests) == 12
    assert 1 < server.max_in_flight <= 4


def test_results_come_in_completion_order(api):
    # the first request to arrive is slow; the others overtake it (with time to spare on a loaded machine)
    server = api()
    captioner = make_captioner(server, max_concurrency=3)
    list(captioner.caption(make_requests(1)))  # the first request goes alone: this one
    server.requests.clear()
    server.plan[:] = [(200, {"X-Delay": "2.0"})]
    results = list(captioner.caption(make_requests(3)))
    order = [index for index, _ in results]
    first_arrival = " ".join(part.get("text", "") for part in server.requests[0][2]["messages"][-1]["content"])
    slow_index = next(index for index, result in results if result.text == first_arrival.strip())
    assert sorted(order) == [0, 1, 2] and order[-1] == slow_index


def test_closing_early_cancels_the_rest(api):
    server = api(delay=0.3)
    iterator = make_captioner(server, max_concurrency=2).caption(make_requests(10))
    next(iterator)
    iterator.close()  # the consumer stops: in-flight requests are cancelled, nothing new is sent
    # Sent before the close: the first two, and at most one more per slot freed by a finished request. One written
    # just before the close may be recorded a moment after it, hence the quiet period before counting.
    sent = wait_until_quiet(server, quiet=0.15)
    assert sent <= 4
    time.sleep(0.4)  # longer than one request: a leftover worker would have sent more by now
    assert len(server.requests) == sent


def test_works_inside_a_running_event_loop(api):
    server = api()

    async def notebook_cell():  # e.g. Jupyter, where a loop is already running
        return dict(make_captioner(server).caption(make_requests(2)))

    results = asyncio.run(notebook_cell())
    assert {i: r.text for i, r in results.items()} == {0: "describe image 0", 1: "describe image 1"}


def test_api_key_never_leaks(api, caplog):
    server = api(plan=[(429, {"Retry-After": "0.05"}), (500, FAST), (500, FAST), (500, FAST)])
    with caplog.at_level(logging.DEBUG):
        captioner = make_captioner(server, max_concurrency=1, max_retries=1)
        results = dict(captioner.caption(make_requests(3)))
    assert [results[0].retries, results[1].retries] == [1, 1] and results[1].text is None
    assert caplog.records  # the SDK did log its retries
    assert SECRET not in caplog.text
    assert SECRET not in repr(captioner) and SECRET not in str(captioner)
    assert SECRET not in json.dumps(captioner.cache_identity())
    assert all(SECRET not in (result.error or "") for result in results.values())
    assert all(header(request, "Authorization") == f"Bearer {SECRET}" for request in server.requests)


def test_missing_key_names_the_variable(monkeypatch, api):
    monkeypatch.delenv("MMFT_UNSET_KEY", raising=False)
    with pytest.raises(ValueError, match="MMFT_UNSET_KEY"):
        OpenAICompatibleCaptioner("fake-vlm", api_key_env="MMFT_UNSET_KEY")
    server = api()
    local = OpenAICompatibleCaptioner("fake-vlm", base_url=server.base_url, api_key_env=None)
    assert next(local.caption(make_requests(1)))[1].text == "describe image 0"
    assert header(server.requests[0], "Authorization") == "Bearer EMPTY"


def test_cache_identity(monkeypatch):
    monkeypatch.setenv("MMFT_TEST_KEY", SECRET)
    base = OpenAICompatibleCaptioner("m", base_url="http://a/v1", api_key_env="MMFT_TEST_KEY")
    assert base.cache_identity() == {
        "backend": "openai-compatible",
        "model": "m",
        "temperature": 0.2,
        "max_tokens": 256,
        "max_image_side": 768,
        "image_format": "JPEG",
        "extra_body": {},
    }
    moved = OpenAICompatibleCaptioner("m", base_url="http://b:9000/v1", api_key_env="MMFT_TEST_KEY", max_retries=1)
    assert moved.cache_identity() == base.cache_identity()  # transport settings are not identity
    for change in ({"temperature": 0.7}, {"extra_body": {"top_k": 1}}, {"image_format": "png"}, {"cache_tag": "q4"}):
        other = OpenAICompatibleCaptioner("m", api_key_env="MMFT_TEST_KEY", **change)
        assert other.cache_identity() != base.cache_identity(), change
    with pytest.raises(ValueError, match="image_format"):
        OpenAICompatibleCaptioner("m", api_key_env="MMFT_TEST_KEY", image_format="webp")
    with pytest.raises(ValueError, match="JSON"):
        OpenAICompatibleCaptioner("m", api_key_env="MMFT_TEST_KEY", extra_body={"x": object()})


def test_a_storm_of_500_trips_the_breaker(api):
    server = api(default=(500, FAST))
    captioner = make_captioner(server, max_retries=1, max_concurrency=4)
    with pytest.raises(CaptionerServerError, match=r"Stopped: \d+ consecutive requests .* server errors") as info:
        list(captioner.caption(make_requests(40)))
    assert "HTTP 500" in str(info.value) and server.base_url in str(info.value)
    # the first request alone (2 attempts), then at most 4 in flight of 2 attempts each before the third failure
    assert wait_until_quiet(server, quiet=0.3) <= 2 + 2 * (2 + 4)


def test_429_beyond_the_retry_budget_trips_the_breaker(api):
    server = api(default=RATE_LIMITED)  # Retry-After 0.05 s, forever
    with pytest.raises(CaptionerServerError, match="HTTP 429"):
        list(make_captioner(server, max_retries=2, max_concurrency=1).caption(make_requests(40)))
    assert wait_until_quiet(server, quiet=0.3) == 3 + 3 + 3  # three requests of 3 attempts each


def test_429_with_a_retry_after_over_two_minutes_fails_at_once(api):
    server = api(default=(429, {"Retry-After": "300"}))
    with pytest.raises(CaptionerServerError, match=r"Retry-After 300 s, beyond the 120 s"):
        list(make_captioner(server, max_retries=5, max_concurrency=1).caption(make_requests(40)))
    assert wait_until_quiet(server, quiet=0.3) == 3  # no request waits 300 s or is retried


def test_a_server_that_hangs_from_the_start_is_not_answering(api):
    server = api(default=HANG)
    captioner = make_captioner(server, timeout=0.3, max_retries=5, max_concurrency=8)
    with pytest.raises(CaptionerNotAnsweringError, match=r"is not answering: it accepts connections") as info:
        list(captioner.caption(make_requests(20)))
    assert "Cannot connect" not in str(info.value) and "--timeout" in str(info.value)
    assert wait_until_quiet(server, quiet=0.3) == 3  # the first request alone: 3 attempts, not 6 nor 20 x 6


def test_a_server_that_stops_answering_is_noticed_within_a_few_timeouts(api):
    server = api(plan=stops_answering_after(3), default=HANG)
    captioner = make_captioner(server, timeout=0.3, max_retries=5, max_concurrency=4)
    seen = []
    with pytest.raises(CaptionerNotAnsweringError, match=r"stopped answering: \d+ consecutive requests timed out"):
        for _, result in captioner.caption(make_requests(20)):
            seen.append(result)
    assert len(seen) == 3 and all(result.text.startswith("describe image") for result in seen)  # the 3 answers
    # the timed-out attempts are not each retried 5 times first: 3 answers, then at most 4 in flight at a time,
    # and the third timeout in a row stops the run
    assert wait_until_quiet(server, quiet=0.3) <= 3 + 4 + 2


def test_finish_reason_and_refusal_reach_the_result(api):
    server = api(plan=[answer("A tabby cat on a rug.", finish_reason=None)])
    ((_, result),) = list(make_captioner(server).caption(make_requests(1)))
    assert (result.text, result.finish_reason, result.refusal) == ("A tabby cat on a rug.", None, None)
    server.plan[:] = [answer("A cat.")]
    ((_, result),) = list(make_captioner(server).caption(make_requests(1)))
    assert (result.text, result.finish_reason) == ("A cat.", "stop")


def run_caption_command(server, tmp_path, image_files_dataset):
    """`mmft-hf caption` in its own process against `server`, with short timeouts; returns the finished process."""
    source = tmp_path / "source"
    image_files_dataset.remove_columns("captions").save_to_disk(str(source))
    script = Path(sys.executable).with_name("mmft-hf")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "mmft_hf.cli"]
    command += [
        "caption", "--dataset_name", str(source), "--domain", "textures", "--captioner", "openai:fake-vlm",
        "--base_url", server.base_url, "--api_key_env", "none", "--cache_dir", str(tmp_path / "cache"),
        "--timeout", "0.5", "--max_retries", "1", "--max_concurrency", "4", "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize(
    ("default", "message"),
    [((500, FAST), "consecutive requests to .* failed with server errors"), (HANG, "is not answering")],
)
def test_caption_command_stops_on_a_failing_server_and_writes_nothing(
    api, tmp_path, image_files_dataset, default, message
):
    server = api(default=default)
    finished = run_caption_command(server, tmp_path, image_files_dataset)
    assert finished.returncode != 0
    (error,) = [line for line in finished.stderr.splitlines() if line.startswith("mmft-hf caption: error: ")]
    assert re.search(message, error), finished.stderr
    assert "0 of 36 captions are cached" in error  # how to resume, on the same line
    assert finished.stderr.rstrip().splitlines()[-1] == error  # the run ends with that one line
    assert "Traceback" not in finished.stderr and "Cannot connect" not in finished.stderr
    assert not (tmp_path / "out").exists()
    # 36 captions: the first request alone (2 attempts), then at most 4 in flight of 2 attempts before the 3rd failure
    assert wait_until_quiet(server, quiet=0.3) <= 2 + 2 * (2 + 4)


def test_a_result_says_whether_any_attempt_was_answered(api):
    # attempts without any HTTP response (timeouts here, connection errors alike) are counted apart: a request none
    # of whose attempts got an answer was never processed, and no summary counts (or bills) it
    server = api(plan=[(200, {}), (200, {"X-Delay": "0.6"}), (200, {"X-Delay": "0.6"}), (200, {"X-Delay": "0.6"})])
    captioner = make_captioner(server, timeout=0.2, max_retries=1, max_concurrency=1)
    captioner.max_consecutive_connection_errors = 5  # three timeouts in a row here: not a server that went away
    results = dict(captioner.caption(make_requests(2)))
    assert (results[0].processed, results[0].unanswered) == (True, 0)
    assert (results[1].processed, results[1].unanswered, results[1].retries) == (False, 2, 1)
    ((_, late),) = list(captioner.caption(make_requests(1)))  # times out once, then answered
    assert late.text and (late.processed, late.unanswered, late.retries) == (True, 1, 1)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    broken = CaptionRequest(Image.open(io.BytesIO(buffer.getvalue()[:60])), "broken")
    ((_, unsent),) = list(captioner.caption([broken]))
    assert unsent.error.startswith("could not prepare the image") and unsent.processed is False
    assert len(server.requests) == 5  # the broken image was never sent


def test_a_cut_answer_is_asked_again_with_the_limit_doubled_up_to_four_times(api):
    # the loopback server cuts its echo of the prompt at max_tokens words (finish_reason "length"), as a real one does
    server = api()
    captioner = make_captioner(server, max_tokens=3, max_answer_retries=3)
    ten_words = "one two three four five six seven eight nine ten"
    ((_, result),) = list(captioner.caption([CaptionRequest(Image.new("RGB", (40, 30)), ten_words)]))
    assert result.text == ten_words and result.max_tokens == 12 and result.retries == 2
    assert result.rejected == ["finish_reason=length"] * 2  # cut at 3 and 6 words, whole at 12
    # a request's own limit (the engine's, for an answer cut in an earlier pass) is where it starts; 4 x 3 is the cap
    twenty_words = f"{ten_words} {ten_words}"
    request = CaptionRequest(Image.new("RGB", (40, 30)), twenty_words, max_tokens=6)
    ((_, capped),) = list(captioner.caption([request]))
    assert capped.text is None and capped.error == "rejected: finish_reason=length" and capped.max_tokens == 12
    assert [body["max_tokens"] for *_, body in server.requests] == [3, 6, 12] + [6, 12, 12, 12]
