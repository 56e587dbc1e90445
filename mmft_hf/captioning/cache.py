"""A persistent caption cache in SQLite: every caption paid for is kept, one committed row per caption.

SQLite in WAL mode gives atomic commits and lets several processes (shards of one captioning job) write to one
file at once. Each caption is committed as soon as it arrives, so a run killed at any point (even SIGKILL) keeps
every finished caption.

The cache is also the single source of truth for who pays for a caption: before requesting one, a run *claims* its
key with a lease (`CaptionCache.claim`). A key that another live run holds is not requested again; the second run
waits for the caption to appear (or for the lease to lapse). A lease ends when its caption is stored (`put`), when
its owner releases it (`release`), when it expires (owners renew theirs with `renew` while they work), or at once
when its owner was a process on this machine that no longer exists (a run killed with SIGKILL).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
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
_CLAIMS_SCHEMA = """
CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires REAL NOT NULL
)
"""
_MAX_PARAMETERS = 500  # stay under SQLite's bound-parameter limit


class CaptionCacheError(sqlite3.DatabaseError):
    """The cache file cannot be used (not an SQLite database, damaged); the message names the file and the fix."""


def new_claim_owner() -> str:
    """A claim owner id unique to this process and call: `"HOST:PID:RANDOM"`.

    `CaptionCache.claim` reads the host and process id back to break, at once, the leases of a process of this
    machine that no longer exists. Owners of another form are only ever released or expired.
    """
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def _owner_is_gone(owner: str) -> bool:
    """Whether `owner` (see `new_claim_owner`) names a process of this host that no longer exists."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # alive but another user's, or not a pid: keep the lease
        return False
    return False


def _unusable(path: str, error: sqlite3.DatabaseError) -> str:
    return (
        f"Cannot use the caption cache {path}: {error}. If the file is damaged, move it aside "
        f"(mv '{path}' '{path}.broken') and run again: the captions it held will be requested again. Or use another "
        "cache directory."
    )


def _names_damage(method):
    """Re-raises a damaged file's `sqlite3.DatabaseError` (found after opening it) as `CaptionCacheError`.

    Operational errors (a lock held too long, a full disk) are not about the file's content and pass unchanged.
    """

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as error:
            if isinstance(error, (sqlite3.OperationalError, CaptionCacheError)):
                raise
            raise CaptionCacheError(_unusable(self.path, error)) from None

    return wrapper


def _chunks(items: list, size: int = _MAX_PARAMETERS):
    for start in range(0, len(items), size):
        yield items[start : start + size]


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
    """A caption store in one SQLite file, shared safely between processes, with leases on keys being requested.

    Use `get_many` to read captions, `claim` before requesting the missing ones, `put` to store each caption as it
    arrives, `renew` while the work goes on and `release` what is given up (see the module docstring).

    Args:
        path (`str`): a directory (the file `captions.sqlite` in it is used) or a path ending in `.sqlite`/`.db`.
        timeout (`float`, defaults to 60.0): seconds to wait for another process's write lock.
    """

    def __init__(self, path: str, timeout: float = 60.0):
        path = os.path.expanduser(str(path))
        if not path.endswith((".sqlite", ".db")):
            path = os.path.join(path, CACHE_FILENAME)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path, self._connection_timeout = path, timeout
        self._connection = sqlite3.connect(path, timeout=timeout, isolation_level=None)
        try:
            self._execute_while_locked("PRAGMA journal_mode=WAL", timeout)
            # FULL: a committed caption also survives power loss, not only a killed process. One fsync per caption
            # is cheap next to an MLLM call.
            self._connection.execute("PRAGMA synchronous=FULL")
            self._execute_while_locked(_SCHEMA, timeout)
            self._execute_while_locked(_CLAIMS_SCHEMA, timeout)
        except sqlite3.DatabaseError as error:
            self._connection.close()
            if isinstance(error, sqlite3.OperationalError) and "locked" in str(error):
                raise  # another process held the lock for longer than `timeout`: the file itself is fine
            raise CaptionCacheError(_unusable(path, error)) from None

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

    @_names_damage
    def get_many(self, keys: Iterable[str]) -> dict[str, str]:
        """Cached texts for `keys` (missing keys are absent from the result)."""
        keys, found = list(keys), {}
        for chunk in _chunks(keys):
            marks = ",".join("?" * len(chunk))
            rows = self._connection.execute(f"SELECT key, text FROM captions WHERE key IN ({marks})", chunk)
            found.update(rows.fetchall())
        return found

    @_names_damage
    def put(self, key: str, text: str, *, image_sha256: str, prompt: str, identity: str, slot: int, usage=None):
        """Stores one caption and commits at once (autocommit), ending any claim on `key`.

        An existing caption for `key` is kept.
        """
        if not text:
            raise ValueError("Refusing to cache an empty caption.")
        self._connection.execute(
            "INSERT OR IGNORE INTO captions (key, text, image_sha256, prompt, identity, slot, usage, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key, text, image_sha256, prompt, identity, int(slot), json.dumps(usage or {}), time.time()),
        )
        self._connection.execute("DELETE FROM claims WHERE key = ?", (key,))

    @_names_damage
    def claim(self, keys: Iterable[str], owner: str, ttl_s: float) -> set[str]:
        """Claims the keys nobody else may request now: a lease of `ttl_s` seconds each, taken atomically.

        A key is granted when it has no caption yet and no live claim of another owner: unclaimed, claimed by
        `owner` itself (the lease is renewed), expired, or claimed by a process of this machine that no longer
        exists. Request only the granted keys; store each caption with `put` (which ends its claim) or `release`
        the keys given up. One transaction for all keys, so two runs claiming at once never both get a key.

        Args:
            keys (`Iterable[str]`): caption keys (`caption_key`).
            owner (`str`): who claims, unique per run; `new_claim_owner()` makes one.
            ttl_s (`float`): lease length in seconds. Renew it with `renew` (or `claim` again) before it lapses
                while the work goes on; wall-clock time, so machines sharing a cache need synchronised clocks.

        Returns:
            `set[str]`: the granted keys.
        """
        keys, granted = list(dict.fromkeys(keys)), set()
        now, gone = time.time(), {}
        self._execute_while_locked("BEGIN IMMEDIATE", self._connection_timeout)
        try:
            for chunk in _chunks(keys):
                marks = ",".join("?" * len(chunk))
                done = {
                    row[0]
                    for row in self._connection.execute(f"SELECT key FROM captions WHERE key IN ({marks})", chunk)
                }
                held = {
                    key: (holder, expires)
                    for key, holder, expires in self._connection.execute(
                        f"SELECT key, owner, expires FROM claims WHERE key IN ({marks})", chunk
                    )
                }
                for key in chunk:
                    if key in done:
                        continue
                    holder, expires = held.get(key, (owner, 0.0))
                    if holder != owner and expires > now:
                        if holder not in gone:
                            gone[holder] = _owner_is_gone(holder)
                        if not gone[holder]:
                            continue
                    granted.add(key)
            self._connection.executemany(
                "INSERT OR REPLACE INTO claims (key, owner, expires) VALUES (?, ?, ?)",
                [(key, owner, now + ttl_s) for key in granted],
            )
            self._connection.execute("COMMIT")
        except BaseException:
            self._connection.execute("ROLLBACK")
            raise
        return granted

    @_names_damage
    def renew(self, owner: str, ttl_s: float) -> int:
        """Extends every lease of `owner` to `ttl_s` seconds from now; returns how many it holds."""
        cursor = self._connection.execute(
            "UPDATE claims SET expires = ? WHERE owner = ?", (time.time() + ttl_s, owner)
        )
        return cursor.rowcount

    @_names_damage
    def release(self, owner: str, keys: Iterable[str] | None = None) -> None:
        """Ends the leases of `owner` on `keys` (all of its leases when `keys` is `None`)."""
        if keys is None:
            self._connection.execute("DELETE FROM claims WHERE owner = ?", (owner,))
            return
        for chunk in _chunks(list(keys)):
            marks = ",".join("?" * len(chunk))
            self._connection.execute(f"DELETE FROM claims WHERE owner = ? AND key IN ({marks})", [owner, *chunk])

    def __len__(self) -> int:
        return self._connection.execute("SELECT COUNT(*) FROM captions").fetchone()[0]

    def close(self):
        self._connection.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ClaimKeeper:
    """Renews the leases of `owner` from a background thread while a run works; releases them all on `close`.

    The thread has its own SQLite connection and renews every `ttl_s / 3` seconds, so a lease lapses only when its
    process stops (or hangs for `ttl_s`). Use it as a context manager or call `close()`.

    Args:
        path (`str`): the cache (as for `CaptionCache`).
        owner (`str`): the claim owner (`new_claim_owner()`).
        ttl_s (`float`): the lease length in seconds.
    """

    def __init__(self, path: str, owner: str, ttl_s: float):
        self.path, self.owner, self.ttl_s = path, owner, ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="caption-claims", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        with CaptionCache(self.path) as cache:  # a connection belongs to the thread that made it
            while not self._stop.wait(self.ttl_s / 3):
                cache.renew(self.owner, self.ttl_s)
            cache.release(self.owner)

    def close(self) -> None:
        """Stops renewing and releases every lease of `owner` (captions not stored by then are free again)."""
        self._stop.set()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
