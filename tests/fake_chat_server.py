"""A chat-completions server on 127.0.0.1 for captioner tests: scripted failures, latency, request log.

`start_fake_api(delay, plan, default)` starts it on a free port in a daemon thread. `plan` is a list of
`(status, headers)` (or `(status, headers, body_override)`) consumed one per request; once it is empty, every
request gets `default` (by default `(200, {})`: success, echoing the prompt text back as the caption). Like a real
server, an answer longer than the request's `max_tokens` (one token per word here) is cut to that many words and
ends with `finish_reason: "length"` (see `within_token_limit`). Stop it with
`server.shutdown(); server.server_close()` (closing also releases hung requests).

Steps for the failure modes (use them in `plan` or as `default`): `(500, {})` for a server failing every request,
`RATE_LIMITED` (HTTP 429 with a short `Retry-After`), `HANG` (accept, read the request, never answer until the server
is closed), `HOLD` (answer only once the test sets `server.resume`, a `threading.Event`), and `answer(...)` for a chosen completion, e.g. `answer(REFUSAL)`, `answer(text, finish_reason="length")`
or `answer(HUGE)`. `stops_answering_after(n)` is a plan of n answers, to be followed by `default=HANG`.
`wait_until_quiet(server, quiet)` counts the requests once they have stopped arriving.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeChatHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real API
    disable_nagle_algorithm = True  # otherwise each response waits ~40 ms

    def log_message(self, *args):
        pass

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            server.requests.append((time.monotonic(), dict(self.headers), body))
            step = server.plan.pop(0) if server.plan else server.default
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        status, headers, override = (*step, None)[:3]
        headers = dict(headers)  # a plan may repeat one step object: never consume its entries
        if headers.pop("X-Hold", None):
            server.resume.wait()  # answers once the test sets `server.resume` (or the server closes)
        if headers.pop("X-Hang", None):
            server.released.wait()  # holds the connection open, without an answer, until the server closes
            with server.lock:
                server.in_flight -= 1
            self.close_connection = True
            return
        time.sleep(float(headers.pop("X-Delay", server.delay)))
        text, finish_reason = within_token_limit(self.reply(body), body)
        if override is not None:
            data = override if isinstance(override, bytes) else json.dumps(override).encode()
        elif status != 200:
            data = json.dumps({"error": {"message": f"HTTP {status}"}}).encode()
        else:
            data = json.dumps(
                {
                    "id": "chatcmpl-test",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body.get("model", "fake"),
                    "choices": [
                        {"index": 0, "finish_reason": finish_reason, "message": {"role": "assistant", "content": text}}
                    ],
                    "usage": self.usage(body, text),
                }
            ).encode()
        with server.lock:
            server.in_flight -= 1
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass

    def reply(self, body: dict) -> str:
        """The answer's text: the prompt, echoed."""
        content = body["messages"][-1]["content"]
        return content if isinstance(content, str) else " ".join(part.get("text", "") for part in content)

    def usage(self, body: dict, text: str) -> dict:
        """The answer's token usage (fixed here; tests/fake_batch_api.py counts it from the request)."""
        return {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def within_token_limit(text: str, body: dict) -> tuple[str, str]:
    """The answer as a server with the request's `max_tokens` sends it, and its `finish_reason`: one token per word
    here, so a longer answer is cut to `max_tokens` words and ends with `"length"`."""
    words, limit = text.split(" "), body.get("max_tokens")
    if isinstance(limit, int) and len(words) > limit:
        return " ".join(words[:limit]), "length"
    return text, "stop"


class FakeChatServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 refuses bursts of concurrent connections

    default = (200, {})  # the step for requests beyond the plan

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.released = threading.Event()
        self.resume = threading.Event()

    def server_close(self):
        self.released.set()  # hung requests end (without an answer) and their threads exit
        self.resume.set()  # held requests are answered
        super().server_close()


RATE_LIMITED = (429, {"Retry-After": "0.05"})
HANG = (200, {"X-Hang": "1"})
HOLD = (200, {"X-Hold": "1"})
REFUSAL = "I'm sorry, but I can't help with that."
HUGE = "lorem ipsum " * 10_000  # 20,000 words, 120,000 characters


def chat_completion(
    content: str = "", finish_reason: str | None = "stop", refusal: str | None = None, completion_tokens: int = 3
) -> dict:
    """A complete chat-completion body with the given answer (5 prompt tokens, `completion_tokens` answer tokens)."""
    message = {"role": "assistant", "content": content}
    if refusal is not None:
        message["refusal"] = refusal
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": "fake",
        "choices": [{"index": 0, "finish_reason": finish_reason, "message": message}],
        "usage": {"prompt_tokens": 5, "completion_tokens": completion_tokens, "total_tokens": 5 + completion_tokens},
    }


def answer(content: str = "", finish_reason: str | None = "stop", refusal: str | None = None) -> tuple:
    """A plan step: HTTP 200 with this answer (instead of the echoed prompt)."""
    return (200, {}, chat_completion(content, finish_reason, refusal))


def stops_answering_after(count: int) -> list:
    """A plan of `count` normal answers; with `default=HANG` the server then stops answering."""
    return [(200, {})] * count


def wait_until_quiet(server: FakeChatServer, quiet: float, timeout: float = 30.0) -> int:
    """Waits until no new request has arrived for `quiet` seconds and returns the number of requests.

    A request the client wrote just before it stopped (closed, killed) is recorded when a handler thread reads it,
    which on a loaded machine can be a moment later: count after a quiet period, not right away.
    """
    deadline = time.monotonic() + timeout
    count, since = len(server.requests), time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() > deadline:
            raise TimeoutError(f"requests kept arriving for {timeout} s")
        time.sleep(0.02)
        if len(server.requests) != count:
            count, since = len(server.requests), time.monotonic()
    return count


def start_fake_api(delay: float = 0.0, plan=(), default=(200, {})) -> FakeChatServer:
    server = FakeChatServer(("127.0.0.1", 0), FakeChatHandler)
    server.lock, server.requests, server.plan, server.delay = threading.Lock(), [], list(plan), delay
    server.default = default
    server.in_flight = server.max_in_flight = 0
    # A short poll interval lets `shutdown()` return in ~50 ms instead of the default 0.5 s.
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    server.base_url = f"http://127.0.0.1:{server.server_port}/v1"
    return server
