"""An OpenAI Batch API on 127.0.0.1 (files and batches) on top of the fake chat server, for batch captioner tests.

`start_fake_batch_api(script=...)` serves, besides `/v1/chat/completions` (see tests/fake_chat_server.py):

- `POST /v1/files` (multipart upload, `purpose=batch`), `GET /v1/files/{id}` and `GET /v1/files/{id}/content`;
- `POST /v1/batches`, `GET /v1/batches/{id}`, `GET /v1/batches` (list), `POST /v1/batches/{id}/cancel`.

A batch walks `validating -> in_progress -> finalizing -> completed` one step per retrieve (like a real batch seen
by a poller), unless `server.hold` is set (it then stays `in_progress`); `server.upload_delay` slows uploads down; `server.batch_api = False` answers 404 to every files and batches call. Each created batch takes the next entry of
`script` (a dict; defaults when the script is empty): `final` (`"completed"`, `"expired"`, `"cancelled"` or
`"failed"`), `fraction` (of the lines processed before an expiry or cancellation, default 0.5), `line_error`
(`custom_id -> HTTP status or None`, for per-line errors) and `answer` (`custom_id -> None or a chat completion
body`, e.g. `chat_completion(REFUSAL)` from tests/fake_chat_server.py, for unusable answers). Processed lines are answered like chat requests (echo;
a JSON object with one field per type for a joint request) but are not chat requests: `server.requests` only logs
those. Usage is counted from the request: prompt words + the image's tiles (85 + 170 per 512-pixel tile, OpenAI's
rule), completion words.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import io
import itertools
import json
import math
import re
import threading
import time

from PIL import Image

from tests.fake_chat_server import FakeChatHandler, FakeChatServer, within_token_limit

TERMINAL = ("completed", "failed", "expired", "cancelled")
_IDS = itertools.count(1)


def prompt_of(body: dict) -> str:
    content = body["messages"][-1]["content"]
    return content if isinstance(content, str) else " ".join(part.get("text", "") for part in content)


def image_tokens(body: dict) -> int:
    """OpenAI's high-detail rule: 85 + 170 per 512 x 512 tile of each image."""
    tokens = 0
    for part in body["messages"][-1]["content"]:
        if isinstance(part, dict) and part.get("type") == "image_url":
            data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
            width, height = Image.open(io.BytesIO(data)).size
            tokens += 85 + 170 * math.ceil(width / 512) * math.ceil(height / 512)
    return tokens


def fake_reply(body: dict, json_replies: bool = True, drop_types: tuple = ()) -> str:
    """Echoes the prompt; a joint request (JSON schema) gets one field per caption type but `drop_types`, as JSON
    (or, with `json_replies=False`, as prose that holds no JSON object)."""
    schema = (body.get("response_format") or {}).get("json_schema", {}).get("schema")
    prompt = prompt_of(body)
    if schema is None:
        return prompt
    fields = {}
    for kind in schema["required"]:
        if kind not in drop_types:  # the per-type prompt is the joint prompt's line `"kind": prompt`
            fields[kind] = f"{kind} caption: " + prompt.split(json.dumps(kind) + ":", 1)[-1].split("\n")[0].strip()
    if json_replies:
        return json.dumps(fields)
    return "Here you go: " + "; ".join(f"{kind} - {text}" for kind, text in fields.items())


def fake_usage(body: dict, text: str) -> dict:
    prompt_tokens = len(prompt_of(body).split()) + image_tokens(body)
    completion_tokens = len(text.split())
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def completion(body: dict, json_replies: bool = True, drop_types: tuple = ()) -> dict:
    text, finish_reason = within_token_limit(fake_reply(body, json_replies, drop_types), body)
    return {
        "id": f"chatcmpl-{next(_IDS)}",
        "object": "chat.completion",
        "created": 0,
        "model": body.get("model", "fake"),
        "choices": [{"index": 0, "finish_reason": finish_reason, "message": {"role": "assistant", "content": text}}],
        "usage": fake_usage(body, text),
    }


def run_engine(requests_path, output_path, fail=(), extra_lines=()):
    """A simulated offline engine, as `vllm run-batch` does it: one output line per request line (an error line for
    the custom_ids in `fail`), then `extra_lines` as they are."""
    with open(requests_path) as source, open(output_path, "w") as sink:
        for line in source:
            request = json.loads(line)
            assert request["method"] == "POST" and request["url"] == "/v1/chat/completions"
            if request["custom_id"] in fail:
                response = {"status_code": 400, "body": {"error": {"message": "context length exceeded"}}}
            else:
                response = {"status_code": 200, "request_id": "r", "body": completion(request["body"])}
            record = {"id": "vllm-1", "custom_id": request["custom_id"], "response": response, "error": None}
            sink.write(json.dumps(record) + "\n")
        for line in extra_lines:
            sink.write(line + "\n")


class FakeBatchHandler(FakeChatHandler):
    def reply(self, body):
        return fake_reply(body, self.server.json_replies, self.server.drop_types)

    def usage(self, body, text):
        return fake_usage(body, text)

    def _send_json(self, value, status: int = 200, raw: bytes | None = None):
        data = raw if raw is not None else json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        server, path = self.server, self.path.split("?")[0]
        if path.endswith("/chat/completions"):
            return super().do_POST()
        data = self.rfile.read(int(self.headers["Content-Length"]))
        if not server.batch_api:  # like vLLM's server: chat completions only
            return self._send_json({"error": {"message": f"Not Found: {path}"}}, 404)
        if path.endswith("/files"):
            time.sleep(server.upload_delay)
        with server.lock:
            if path.endswith("/files"):
                message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + data
                )
                parts = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
                content = parts["file"].get_payload(decode=True)
                file = self._new_file(content, parts["purpose"].get_payload(decode=True).decode(), "upload.jsonl")
                server.uploads.append(file["id"])
                return self._send_json(file)
            if path.endswith("/batches"):
                request = json.loads(data)
                if request["input_file_id"] not in server.files:
                    return self._send_json({"error": {"message": "No such file"}}, 404)
                script = server.script.pop(0) if server.script else {}
                batch = {
                    "id": f"batch_{next(_IDS)}",
                    "object": "batch",
                    "endpoint": request["endpoint"],
                    "input_file_id": request["input_file_id"],
                    "completion_window": request["completion_window"],
                    "status": "validating",
                    "created_at": int(time.time()),
                    "request_counts": {"total": 0, "completed": 0, "failed": 0},
                    "metadata": request.get("metadata"),
                }
                server.batches[batch["id"]] = batch
                server.scripts[batch["id"]] = script
                server.created.append(batch["id"])
                return self._send_json(batch)
            match = re.search(r"/batches/([^/]+)/cancel$", path)
            if match and match.group(1) in server.batches:
                batch = server.batches[match.group(1)]
                if batch["status"] not in TERMINAL:
                    batch["status"] = "cancelling"
                return self._send_json(batch)
        self._send_json({"error": {"message": f"no route {path}"}}, 404)

    def do_GET(self):
        server, path = self.server, self.path.split("?")[0]
        with server.lock:
            if match := re.search(r"/files/([^/]+)/content$", path):
                return self._send_json(None, raw=server.contents[match.group(1)])
            if match := re.search(r"/files/([^/]+)$", path):
                return self._send_json(server.files[match.group(1)])
            if match := re.search(r"/batches/([^/]+)$", path):
                server.retrieves.append(match.group(1))
                return self._send_json(self._advance(server.batches[match.group(1)]))
            if path.endswith("/batches"):
                data = sorted(server.batches.values(), key=lambda b: b["created_at"], reverse=True)
                return self._send_json({"object": "list", "data": data, "has_more": False})
        self._send_json({"error": {"message": f"no route {path}"}}, 404)

    def _new_file(self, content: bytes, purpose: str, filename: str) -> dict:
        file = {
            "id": f"file-{next(_IDS)}",
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
        }
        self.server.files[file["id"]], self.server.contents[file["id"]] = file, content
        return file

    def _advance(self, batch: dict) -> dict:
        """One step of the batch's life per retrieve (the server lock is held)."""
        server, script = self.server, self.server.scripts[batch["id"]]
        status, final = batch["status"], script.get("final", "completed")
        if status == "validating":
            if final == "failed":
                batch["status"] = "failed"
                batch["errors"] = {"object": "list", "data": [{"code": "invalid_request", "message": "bad file"}]}
            else:
                batch["status"] = "in_progress"
        elif status == "in_progress" and not server.hold:
            batch["status"] = "expired" if final == "expired" else "finalizing"
            if final == "cancelled":
                batch["status"] = "cancelling"
        elif status == "cancelling":
            self._process(batch, script, stop_code="batch_cancelled")
            batch["status"] = "cancelled"
        elif status == "finalizing":
            self._process(batch, script)
            batch["status"] = "completed"
        if batch["status"] == "expired" and "output_file_id" not in batch:
            self._process(batch, script, stop_code="batch_expired")
        return batch

    def _process(self, batch: dict, script: dict, stop_code: str | None = None) -> None:
        lines = [json.loads(line) for line in self.server.contents[batch["input_file_id"]].decode().splitlines()]
        stop = len(lines) if stop_code is None else int(len(lines) * script.get("fraction", 0.5))
        output, errors = [], []
        for index, line in enumerate(lines):
            record = {"id": f"batch_req_{next(_IDS)}", "custom_id": line["custom_id"]}
            code = script.get("line_error", lambda custom_id: None)(line["custom_id"])
            if index >= stop:
                errors.append({**record, "response": None, "error": {"code": stop_code, "message": "not run"}})
            elif code:
                body = {"error": {"message": "upstream failure", "type": "server_error"}}
                errors.append({**record, "response": {"status_code": code, "body": body}, "error": None})
            else:
                body = script.get("answer", lambda custom_id: None)(line["custom_id"])
                response = {
                    "status_code": 200,
                    "request_id": "r",
                    "body": body or completion(line["body"], self.server.json_replies, self.server.drop_types),
                }
                output.append({**record, "response": response, "error": None})
            if index < stop:  # the lines the provider ran (and bills); the others were never run
                self.server.processed.append(line["custom_id"])
        for name, records in (("output_file_id", output), ("error_file_id", errors)):
            content = "".join(json.dumps(record) + "\n" for record in records).encode()
            batch[name] = self._new_file(content, "batch_output", f"{name}.jsonl")["id"] if records else None
        batch["request_counts"] = {"total": len(lines), "completed": len(output), "failed": len(errors)}


def start_fake_batch_api(script=(), hold=False, json_replies=True, drop_types=()) -> FakeChatServer:
    """Starts the server; `server.base_url` is its API root. Stop it with `shutdown(); server_close()`."""
    server = FakeChatServer(("127.0.0.1", 0), FakeBatchHandler)
    server.lock, server.requests, server.plan, server.delay = threading.Lock(), [], [], 0.0
    server.in_flight = server.max_in_flight = 0
    server.script, server.hold, server.json_replies, server.drop_types = list(script), hold, json_replies, drop_types
    server.files, server.contents, server.batches, server.scripts = {}, {}, {}, {}
    server.uploads, server.created, server.retrieves, server.processed = [], [], [], []
    server.upload_delay, server.batch_api = 0.0, True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    server.base_url = f"http://127.0.0.1:{server.server_port}/v1"
    return server
