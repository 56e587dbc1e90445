"""A persistent caption cache in SQLite: every caption paid for is kept, one committed row per caption.

SQLite in WAL mode gives atomic commits and lets several processes (shards of one captioning job) write to one
file at once. Each caption is committed as soon as it arrives, so a run killed at any point (even SIGKILL) keeps
every finished caption.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable

CACHE_FILENAME = "captions.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS captions (
    key TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    prompt TEXT NOT NULL,
    identity TEXT NOT NULL,
    slot INTEGER NOT NULL,
    usage TEXT,
    created REAL NOT NULL
)
"""


def default_cache_dir() -> str:
    """`$MMFT_HF_CACHE`, else `$HF_HOME/mmft_hf` (usually `~/.cache/huggingface/mmft_hf`)."""
    if os.environ.get("MMFT_HF_CACHE"):
        return os.path.expanduser(os.environ["MMFT_HF_CACHE"])
    from huggingface_hub import constants

    return os.path.join(constants.HF_HOME, "mmft_hf")


def identity_json(identity: dict) -> str:
    """Canonical JSON of a captioner identity (sorted keys), as used in cache keys."""
    try:
        return json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except TypeError as error:
        raise TypeError(f"Captioner.cache_identity() must return JSON-serialisable data: {error}") from None


def caption_key(image_sha256: str, prompt: str, identity: str, slot: int) -> str:
    """The cache key of one caption: sha256 over image content, full prompt, captioner identity and slot.

    `slot` numbers the captions of one (image, prompt): `captions_per_type=3` asks for slots 0, 1 and 2, so each
    is a distinct caption, and raising `captions_per_type` later reuses the slots already paid for.
    """
    payload = json.dumps([image_sha256, prompt, identity, int(slot)], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class CaptionCache:
    """A caption store in one SQLite file, shared safely between processes.

    Args:
        path (`str`): a directory (the file `captions.sqlite` in it is used) or a path ending in `.sqlite`/`.db`.
        timeout (`float`, defaults to 60.0): seconds to wait for another process's write lock.
    """

    def __init__(self, path: str, timeout: float = 60.0):
        path = os.path.expanduser(str(path))
        if not path.endswith((".sqlite", ".db")):
            path = os.path.join(path, CACHE_FILENAME)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._connection = sqlite3.connect(path, timeout=timeout, isolation_level=None)
        self._execute_while_locked("PRAGMA journal_mode=WAL", timeout)
        # FULL: a committed caption also survives power loss, not only a killed process. One fsync per caption
        # is cheap next to an MLLM call.
        self._connection.execute("PRAGMA synchronous=FULL")
        self._execute_while_locked(_SCHEMA, timeout)

    def _execute_while_locked(self, statement: str, timeout: float) -> None:
        """Runs `statement`, retrying while another connection holds the lock.

        Switching a new file to WAL needs an exclusive lock, and SQLite answers "database is locked" at once
        (without its busy handler) when shards open one fresh cache at the same moment.
        """
        deadline, pause = time.monotonic() + timeout, 0.01
        while True:
            try:
                self._connection.execute(statement)
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(pause)
                pause = min(2 * pause, 0.5)

    def get_many(self, keys: Iterable[str]) -> dict[str, str]:
        """Cached texts for `keys` (missing keys are absent from the result)."""
        keys, found = list(keys), {}
        for start in range(0, len(keys), 500):  # stay under SQLite's bound-parameter limit
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._connection.execute(f"SELECT key, text FROM captions WHERE key IN ({marks})", chunk)
            found.update(rows.fetchall())
        return found

    def put(self, key: str, text: str, *, image_sha256: str, prompt: str, identity: str, slot: int, usage=None):
        """Stores one caption and commits at once (autocommit). An existing caption for `key` is kept."""
        if not text:
            raise ValueError("Refusing to cache an empty caption.")
        self._connection.execute(
            "INSERT OR IGNORE INTO captions (key, text, image_sha256, prompt, identity, slot, usage, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key, text, image_sha256, prompt, identity, int(slot), json.dumps(usage or {}), time.time()),
        )

    def __len__(self) -> int:
        return self._connection.execute("SELECT COUNT(*) FROM captions").fetchone()[0]

    def close(self):
        self._connection.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
