"""What was sent to a batch engine and where its answers go: tables in the caption cache's SQLite file.

A batch (OpenAI/Gemini Batch API) or an exported request file (`vllm run-batch`, any offline engine) is paid for
once it is submitted, so it is recorded in the cache *before* anyone waits for it: the submission, and for each of
its `custom_id`s the cache entries its answer fills. A rerun after a crash finds the open submission and polls it
instead of paying again; `import_caption_results` validates every `custom_id` of a result file against it.

Tables (next to `captions` in the same file):

- `submissions`: one row per batch or exported file: `id` (the uploaded file id, or `export:...`), `kind`
  (`"openai-batch"` or `"export"`), `remote_id` (the Batch API's batch id, once created), `status` (`"open"` until
  its results are read, then the final batch status), `info` (JSON: the batch `endpoint`, the request count, an
  export's file path) and `created`. An open batch is a claim on its captions for every run sharing the cache.
- `submitted_requests`: `(custom_id, submission)` -> the request's `unit` (JSON: whether it is a joint request, its
  prompt, the captioner identity, and the cache entries its answer fills: key, caption type, image hash, prompt,
  identity, slot).
- `caption_origins`: cache key -> how the caption was made when not by the plain per-type request (e.g.
  `{"request": "joint", "prompt": ...}` for one-request-per-image captions).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable

from .cache import CaptionCache

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS submissions (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        remote_id TEXT,
        status TEXT NOT NULL,
        info TEXT NOT NULL,
        created REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS submitted_requests (
        custom_id TEXT NOT NULL,
        submission TEXT NOT NULL,
        unit TEXT NOT NULL,
        PRIMARY KEY (custom_id, submission)
    )""",
    "CREATE INDEX IF NOT EXISTS submitted_requests_submission ON submitted_requests (submission)",
    """CREATE TABLE IF NOT EXISTS caption_origins (
        key TEXT PRIMARY KEY,
        origin TEXT NOT NULL
    )""",
)
OPEN = "open"


class SubmissionLedger:
    """The submission tables of one caption cache, on their own connection to the cache's SQLite file.

    Args:
        cache (`CaptionCache`): the open caption cache whose file holds the tables.
        timeout (`float`, defaults to 60.0): seconds to wait for another process's write lock.
    """

    def __init__(self, cache: CaptionCache, timeout: float = 60.0):
        self.path = cache.path
        self._connection = sqlite3.connect(cache.path, timeout=timeout, isolation_level=None)
        self._connection.execute("PRAGMA synchronous=FULL")
        for statement in _SCHEMA:
            self._connection.execute(statement)

    def record(self, submission_id: str, kind: str, units: dict[str, dict], info: dict | None = None) -> None:
        """Records a submission and its requests in one transaction, before anything waits for it.

        Args:
            submission_id (`str`): the uploaded file id, or an `export:` id.
            kind (`str`): `"openai-batch"` or `"export"`.
            units (`dict[str, dict]`): `custom_id` -> the request's unit (see the module docstring).
            info (`dict`, *optional*): JSON-ready details (file path, endpoint, request count).
        """
        with self._connection:
            self._connection.execute("BEGIN IMMEDIATE")
            self._connection.execute(
                "INSERT INTO submissions (id, kind, remote_id, status, info, created) VALUES (?, ?, NULL, ?, ?, ?)",
                (submission_id, kind, OPEN, json.dumps(info or {}), time.time()),
            )
            self._connection.executemany(
                "INSERT OR REPLACE INTO submitted_requests (custom_id, submission, unit) VALUES (?, ?, ?)",
                [(custom_id, submission_id, json.dumps(unit)) for custom_id, unit in units.items()],
            )

    def set_remote_id(self, submission_id: str, remote_id: str) -> None:
        """Records the batch id the API gave the submission."""
        self._connection.execute("UPDATE submissions SET remote_id = ? WHERE id = ?", (remote_id, submission_id))

    def close_submission(self, submission_id: str, status: str) -> None:
        """Marks a submission as read to the end, with its final status (`completed`, `expired`, ...)."""
        self._connection.execute("UPDATE submissions SET status = ? WHERE id = ?", (status, submission_id))

    def open_submissions(self, kind: str) -> list[dict]:
        """The submissions of `kind` whose results have not been read yet, oldest first.

        Returns:
            `list[dict]`: `id`, `remote_id`, `info` and `custom_ids` (a set) of each.
        """
        rows = self._connection.execute(
            "SELECT id, remote_id, info FROM submissions WHERE kind = ? AND status = ? ORDER BY created", (kind, OPEN)
        ).fetchall()
        return [
            {"id": sid, "remote_id": remote, "info": json.loads(info), "custom_ids": self.custom_ids(sid)}
            for sid, remote, info in rows
        ]

    def open_submissions_holding(self, kind: str, keys: set[str]) -> list[dict]:
        """The open submissions of `kind` whose requests fill any of the caption `keys`, oldest first.

        An open batch is a claim on its captions for every run sharing the cache: they may still be delivered.

        Returns:
            `list[dict]`: as `open_submissions`, plus `keys` (the set of caption keys its requests fill).
        """
        found = []
        for submission in self.open_submissions(kind):
            rows = self._connection.execute(
                "SELECT unit FROM submitted_requests WHERE submission = ?", (submission["id"],)
            )
            held = {entry["key"] for (unit,) in rows for entry in json.loads(unit)["entries"]}
            if held & keys:
                found.append({**submission, "keys": held})
        return found

    def custom_ids(self, submission_id: str) -> set[str]:
        """The `custom_id`s of one submission."""
        rows = self._connection.execute(
            "SELECT custom_id FROM submitted_requests WHERE submission = ?", (submission_id,)
        )
        return {row[0] for row in rows}

    def units(self, custom_ids: Iterable[str]) -> dict[str, dict]:
        """The recorded unit of each known `custom_id` (unknown ids are absent); the newest record wins."""
        custom_ids, found = list(dict.fromkeys(custom_ids)), {}
        for start in range(0, len(custom_ids), 500):
            chunk = custom_ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._connection.execute(
                "SELECT r.custom_id, r.unit FROM submitted_requests r JOIN submissions s ON s.id = r.submission "
                f"WHERE r.custom_id IN ({marks}) ORDER BY s.created",
                chunk,
            )
            found.update((custom_id, json.loads(unit)) for custom_id, unit in rows)
        return found

    def set_origin(self, key: str, origin: dict) -> None:
        """Records how the caption under `key` was made (kept if one is recorded already, like the caption)."""
        self._connection.execute(
            "INSERT OR IGNORE INTO caption_origins (key, origin) VALUES (?, ?)", (key, json.dumps(origin))
        )

    def origins(self, keys: Iterable[str]) -> dict[str, dict]:
        """The recorded origins of `keys` (keys made by a plain per-type request are absent)."""
        keys, found = list(keys), {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._connection.execute(f"SELECT key, origin FROM caption_origins WHERE key IN ({marks})", chunk)
            found.update((key, json.loads(origin)) for key, origin in rows)
        return found

    def usages(self, keys: Iterable[str]) -> dict[str, tuple[dict, dict | None]]:
        """The token usage recorded with each cached caption of `keys`, and its origin (`None` for a per-type one).

        A per-type caption carries its request's usage; a caption of a joint request carries none itself, its
        origin carries the joint request's usage (shared by the captions of that request).
        """
        keys, found = list(keys), {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._connection.execute(
                "SELECT c.key, c.usage, o.origin FROM captions c LEFT JOIN caption_origins o ON o.key = c.key "
                f"WHERE c.key IN ({marks})",
                chunk,
            )
            found.update(
                (key, (json.loads(usage or "{}"), json.loads(origin) if origin else None))
                for key, usage, origin in rows
            )
        return found

    def close(self) -> None:
        self._connection.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
