"""The one captioning pass engine: request units in, cached captions out, the same promises on every path.

A *request unit* is one request and the caption slots its answer fills: one slot for a per-type request, every
caption type of an image (one copy) for a one-request-per-image (joint) request. Units carry the captioner identity
in their record and keys, so several captioners (`caption_dataset` with a list) share one cache and ledger without
mixing their captions. The engine owns everything but the transport:

- **claims**: before a unit is sent its captions are claimed in the cache (`CaptionCache.claim`); captions another
  live run has claimed are waited for and read from the cache, never requested twice. An open batch recorded in the
  ledger is a claim too: a run needing its captions polls it (whatever the run's own backend) instead of paying again.
- **images**: loaded once per row and chunk, resized on retry passes, unreadable ones reported and never retried;
  rows with identical image bytes and prompts share one request.
- **the quality gate** (`quality.py`): empty, refused, cut or runaway answers are never stored; they are counted by
  reason and asked again in the next pass (up to `max_passes`), or reported and left missing (import). An answer cut
  by the token limit is asked again with a raised limit (`quality.raised_token_limit`) when the backend has one.
- **usage and the summary**: what the provider processed and billed (requests or batch lines, tokens), counted once,
  by the run that read the answer; attempts that got no answer (connection errors, timeouts) are counted apart.

Backends only answer: a `Captioner` (synchronous: OpenAI-compatible, local transformers VLM) or a `BatchCaptioner`
(the OpenAI Batch API) from `captioners/base.py`. Imported result files go through `store_answer` like batch lines.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from ..images import IMAGE_DECODE_ERRORS
from .batch_files import parse_output_line
from .cache import CaptionCache, caption_key
from .captioners.base import BatchCaptioner, CaptionRequest, CaptionResult, TokenLimitedCaptioner
from .joint import build_joint_prompt, joint_response_format, parse_joint_reply
from .ledger import SubmissionLedger
from .quality import MAX_TOKEN_LIMIT_FACTOR, is_cut, max_words_asked, raised_token_limit, rejection_reason

logger = logging.getLogger(__name__)

# A run claims each caption in the cache before requesting it; its leases last this long unless renewed (they are
# renewed every third of it while the run lives), and a run waiting for another's captions looks this often.
CLAIM_TTL_S = 60.0
CLAIM_POLL_S = 0.5
BATCH_KIND = "openai-batch"
EXPORT_KIND = "export"
JOINT = "joint"
REJECTED = "rejected: "  # how a backend that applies the quality gate itself reports a rejected answer
FAILURES_LOGGED = 20  # missing captions listed in the log; the rest are counted
RAISE_MAX_TOKENS = "raise --max_tokens (max_tokens= in Python) if captions are often cut"


@dataclass
class CaptionFailure:
    """A caption that could not be made.

    Args:
        row (`int`): row index in the dataset passed to `caption_dataset` (before sharding).
        caption_type (`str`): the caption type (characteristic word).
        slot (`int`): which caption of that type (0 .. captions_per_type - 1).
        reason (`str`): the last error reported for it.
        source (`str`, defaults to `""`): the captioner's name (`caption_source`) when several caption the dataset.
    """

    row: int
    caption_type: str
    slot: int
    reason: str
    source: str = ""

    def __str__(self) -> str:
        who = f"captioner {self.source}, " if self.source else ""
        return f"row {self.row}, {who}caption type {self.caption_type!r} (slot {self.slot}): {self.reason}"


@dataclass
class CaptioningSummary:
    """What one `caption_dataset` call did (summed over its captioners); attached to its result as
    `result.caption_summary`.

    Args:
        num_rows (`int`): rows captioned (this shard's rows when sharding).
        captions_expected (`int`): `num_rows × len(caption_types) × captions_per_type` (× captioners).
        captions_done (`int`): captions in the result.
        cache_hits (`int`): captions found in the cache before any request.
        from_other_runs (`int`): captions another run sharing the cache was making (it had claimed them), read from
            the cache once stored instead of being paid for twice.
        requests (`int`): requests the provider processed for this run (synchronous requests that got an answer,
            batch lines run), over all passes; requests never sent (unreadable images), requests none of whose
            attempts got an answer (see `unanswered`) and batch lines never run are not counted.
        retries (`int`): extra attempts of those requests that the provider answered (HTTP 5xx or 429 retried,
            answers the backend asked again): `requests + retries` synchronous requests were answered.
        unanswered (`int`): attempts that got no answer at all (connection refused or reset, timed out before any
            response): never processed, not billed, counted in neither `requests` nor `retries`.
        passes (`int`): passes over missing captions.
        rejected (`dict[str, int]`): answers the quality gate refused, by reason (`"refusal"`, `"too long"`, ...).
        cut (`int`): of those, answers cut by the token limit (`finish_reason="length"`); with a backend that has a
            token limit (`TokenLimitedCaptioner`) each was asked again with it raised (doubled per re-ask, at most
            4 × `max_tokens`).
        failures (`list[CaptionFailure]`): captions still missing.
        rows_incomplete (`int`): rows with some, but not all, captions.
        rows_without_captions (`int`): rows with no caption at all (their list is empty).
        usage (`dict[str, int]`): summed token counts the provider reported for the requests counted above.
        elapsed_s (`float`): wall-clock seconds.
        cache_path (`str`): the SQLite cache file.
    """

    num_rows: int = 0
    captions_expected: int = 0
    captions_done: int = 0
    cache_hits: int = 0
    from_other_runs: int = 0
    requests: int = 0
    retries: int = 0
    unanswered: int = 0
    passes: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    cut: int = 0
    failures: list[CaptionFailure] = field(default_factory=list)
    rows_incomplete: int = 0
    rows_without_captions: int = 0
    usage: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    cache_path: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def account(self, result: CaptionResult) -> None:
        """Counts one result: its request, answered retries and tokens if the provider processed it (and bills
        it), and its attempts that got no answer."""
        self.unanswered += int(result.unanswered or 0)
        if not result.processed:
            return
        self.requests += 1
        self.retries += max(0, int(result.retries or 0) - int(result.unanswered or 0))
        for name, value in (result.usage or {}).items():
            if isinstance(value, (int, float)):
                self.usage[name] = self.usage.get(name, 0) + value

    def __str__(self) -> str:
        text = (
            f"Captioned {self.num_rows} rows: {self.captions_done}/{self.captions_expected} captions "
            f"({self.cache_hits} from cache, "
            + (f"{self.from_other_runs} from another run, " if self.from_other_runs else "")
            + f"{self.requests} requests in {self.passes} pass(es), {self.retries} backend retries, "
            + (f"{self.unanswered} attempt(s) got no answer, " if self.unanswered else "")
            + f"{len(self.failures)} failed) in {self.elapsed_s:.1f} s"
            + (f"; tokens {self.usage}" if self.usage else "")
            + (f"; answers rejected by the quality gate (asked again): {self.rejected}" if self.rejected else "")
            + (
                f"; {self.cut} answer(s) cut by the token limit (asked again with it raised, up to "
                f"{MAX_TOKEN_LIMIT_FACTOR} × max_tokens): {RAISE_MAX_TOKENS}"
                if self.cut
                else ""
            )
            + f"; cache {self.cache_path}."
        )
        if self.failures:
            text += (
                f" {self.rows_incomplete} row(s) kept with fewer captions and {self.rows_without_captions} with none "
                "(the trainer uses the class template for those). Run the same call again to request only the "
                "missing captions."
            )
        return text


class CaptioningError(RuntimeError):
    """Captions are missing after all passes, so no dataset is returned (`allow_missing=False`, or `strict=True`).

    `.failures` lists them and `.summary` is the run's `CaptioningSummary`. The message is one line.
    """

    def __init__(self, failures: list[CaptionFailure], summary: CaptioningSummary, hint: str = ""):
        self.failures, self.summary = failures, summary
        reasons: dict[str, int] = {}
        for failure in failures:
            reasons[failure.reason] = reasons.get(failure.reason, 0) + 1
        common = sorted(reasons.items(), key=lambda item: -item[1])[:3]
        shown = "; ".join(f"{count} × {reason}" for reason, count in common)
        more = f"; {len(reasons) - 3} other reason(s)" if len(reasons) > 3 else ""
        cut = sum(count for reason, count in reasons.items() if is_cut(reason))
        cut = f" {cut} of them were cut by the token limit: raise --max_tokens (max_tokens= in Python)." if cut else ""
        super().__init__(
            f"{len(failures)} caption(s) still missing after all passes ({shown}{more}; first: {failures[0]}); "
            f"nothing was written.{cut} Every finished caption is cached in {summary.cache_path}: rerun to request "
            f"only the missing ones{hint}."
        )


class CaptioningInterrupted(KeyboardInterrupt):
    """Ctrl-C during `caption_dataset`: a `KeyboardInterrupt` whose message says what is cached and how to resume."""


class OpenBatchError(RuntimeError):
    """Captions this run needs are in an open batch it cannot poll (another provider's Batch API)."""


@dataclass
class CaptionRows:
    """The rows being captioned, as the engine sees them.

    Args:
        keys (`list[list[str | None]]`): the cache key per row and slot (`None` for a missing image).
        prompts (`list[list[str]]`): the per-type prompt per row and slot.
        image_hashes (`list[str | None]`): the sha256 of each row's image bytes (`None`: no image).
        slots (`list[tuple[str, int]]`): `(caption type, copy)` per slot, type-major.
        identity (`str`): the captioner identity JSON, as in the cache keys.
        load_image (`Callable[[int, bool], PIL.Image.Image]`): loads a row's image, resized for a retry when the flag
            is set; raises one of `IMAGE_DECODE_ERRORS` for an unreadable image.
        first_row (`int`, defaults to 0): the number of row 0 in messages (a shard's start).
        image_column (`str`, defaults to `"image"`): the image column, named in messages about missing images.
    """

    keys: list
    prompts: list
    image_hashes: list
    slots: list
    identity: str
    load_image: Callable
    first_row: int = 0
    image_column: str = "image"


@dataclass
class RequestUnit:
    """One request and where its answer goes.

    Args:
        custom_id (`str`): the cache key of its caption, or for a joint request the key of the joint prompt.
        row (`int`): the row whose image it sends.
        targets (`list[int]`): the caption slots of that row its answer fills.
        prompt (`str`): the prompt sent.
        response_format (`dict`, *optional*): the JSON schema of a joint request.
        record (`dict`): the JSON-ready description kept in the ledger: `joint`, `prompt`, `identity` (the
            captioner's) and the cache `entries` (key, caption type, image hash, per-type prompt, identity, slot).
    """

    custom_id: str
    row: int
    targets: list[int]
    prompt: str
    response_format: dict | None
    record: dict

    @property
    def keys(self) -> list[str]:
        return [entry["key"] for entry in self.record["entries"]]


def build_units(rows: CaptionRows, texts: list, joint: bool, skip_rows: Iterable[int] = ()) -> list[RequestUnit]:
    """The request units of every missing caption, one per `custom_id`: per type, or one per image and copy when
    `joint` (a single missing type is asked for with its own prompt). Rows without an image or in `skip_rows` get
    none; rows with identical image bytes and prompts share one unit (the first)."""
    units, seen, skip = [], set(), set(skip_rows)
    for row, digest in enumerate(rows.image_hashes):
        if not digest or row in skip:
            continue
        groups: dict = {}
        for s, text in enumerate(texts[row]):
            if text is None:
                groups.setdefault(rows.slots[s][1] if joint else (s,), []).append(s)
        for group in groups.values():
            entries = [
                {
                    "key": rows.keys[row][s],
                    "caption_type": rows.slots[s][0],
                    "image_sha256": digest,
                    "prompt": rows.prompts[row][s],
                    "identity": rows.identity,
                    "slot": rows.slots[s][1],
                }
                for s in group
            ]
            if len(group) == 1:
                prompt, custom_id, response_format = entries[0]["prompt"], entries[0]["key"], None
            else:
                prompt = build_joint_prompt({entry["caption_type"]: entry["prompt"] for entry in entries})
                custom_id = caption_key(digest, prompt, rows.identity, entries[0]["slot"])
                response_format = joint_response_format([entry["caption_type"] for entry in entries])
            if custom_id in seen:
                continue
            seen.add(custom_id)
            record = {JOINT: len(group) > 1, "prompt": prompt, "identity": rows.identity, "entries": entries}
            units.append(RequestUnit(custom_id, row, group, prompt, response_format, record))
    return units


@dataclass
class StoredAnswer:
    """What `store_answer` did with one answer.

    Args:
        captions (`dict[str, str]`): key -> the caption now in the cache for it (new, or the one already there).
        new (`int`): captions stored by this answer.
        problem (`str`): why some of the unit's captions are still missing (empty when none is).
        rejected (`list[str]`): the quality gate's reasons for the answer or the captions it refused.
        conflicts (`list[str]`): keys whose cached caption differs from this answer's (the cached one is kept).
    """

    captions: dict = field(default_factory=dict)
    new: int = 0
    problem: str = ""
    rejected: list = field(default_factory=list)
    conflicts: list = field(default_factory=list)


def _gate(text: str | None, result: CaptionResult | None, prompt: str) -> str | None:
    return rejection_reason(
        text,
        finish_reason=result.finish_reason if result is not None else None,
        refusal=result.refusal if result is not None else None,
        max_words=max_words_asked(prompt),
    )


def store_answer(cache: CaptionCache, ledger: SubmissionLedger, record: dict, result: CaptionResult) -> StoredAnswer:
    """Passes one answer through the quality gate and commits its captions to the cache under their per-type keys.

    A joint answer is parsed into its caption types, each judged on its own; its captions' origin (the joint prompt
    and the request's usage) goes to the ledger's `caption_origins`. A rejected answer or caption is never stored.

    Args:
        cache (`CaptionCache`): where the captions go.
        ledger (`SubmissionLedger`): where joint origins go.
        record (`dict`): the unit's record (see `RequestUnit`).
        result (`CaptionResult`): the answer.

    Returns:
        `StoredAnswer`: the captions now cached for the unit's keys, what is missing and why.
    """
    entries, answer = record["entries"], StoredAnswer()
    text = (result.text or "").strip() or None
    if result.text is None and (result.error or "").startswith(REJECTED):  # a backend that applies the gate itself
        reason = result.error[len(REJECTED) :]
    elif result.text is None and not result.refusal:
        answer.problem = result.error or "the captioner returned no caption"  # no answer at all (transport, HTTP)
        return answer
    else:
        reason = _gate(text, result, record["prompt"])
    if reason:
        answer.problem = f"answer rejected ({reason})"
        answer.rejected.append(reason)
        return answer
    if record[JOINT]:
        found, problem = parse_joint_reply(text, [entry["caption_type"] for entry in entries])
    else:
        found, problem = {entries[0]["caption_type"]: text}, ""
    for entry in entries:
        caption = found.get(entry["caption_type"])
        if caption is not None and record[JOINT]:
            reason = _gate(caption, None, entry["prompt"])
            if reason:
                answer.rejected.append(reason)
                problem = f"caption {entry['caption_type']!r} rejected ({reason})"
                found.pop(entry["caption_type"])
    cached = cache.get_many(entry["key"] for entry in entries if entry["caption_type"] in found)
    for entry in entries:
        caption = found.get(entry["caption_type"])
        if caption is None:
            continue
        key = entry["key"]
        if key in cached:
            if cached[key] != caption:
                answer.conflicts.append(key)
            answer.captions[key] = cached[key]
            continue
        fields = {name: entry[name] for name in ("image_sha256", "prompt", "identity", "slot")}
        cache.put(key, caption, usage={} if record[JOINT] else result.usage, **fields)
        if record[JOINT]:
            ledger.set_origin(key, {"request": JOINT, "prompt": record["prompt"], "usage": result.usage})
        answer.captions[key] = caption
        answer.new += 1
    if len(answer.captions) < len(entries):
        answer.problem = problem or "no caption in the answer"
    return answer


def reason_kind(reason: str) -> str:
    """The category a rejection reason is counted under (`"refusal: I'm sorry..."` -> `"refusal"`)."""
    return reason.split(":", 1)[0].split(" (", 1)[0]


def log_failures(failures: list[CaptionFailure], what: str) -> None:
    """Logs missing captions as a warning: how many (`what` says why, e.g. `"missing"`), the first ones one per line."""
    if failures:
        more = f"\n... and {len(failures) - FAILURES_LOGGED} more" if len(failures) > FAILURES_LOGGED else ""
        shown = "\n".join(map(str, failures[:FAILURES_LOGGED]))
        logger.warning("%d caption(s) %s:\n%s%s", len(failures), what, shown, more)


class CaptionEngine:
    """Runs the passes of one captioner over `CaptionRows` (see the module docstring); several captioners run one
    engine each, in turn, sharing the cache, ledger, claim owner and summary.

    Args:
        captioner (`Captioner`): the backend; a `BatchCaptioner` gets its units as batches.
        rows (`CaptionRows`): the rows, keys and prompts.
        cache (`CaptionCache`): the open caption cache.
        ledger (`SubmissionLedger`): its submission tables.
        summary (`CaptioningSummary`): counters, updated in place.
        claim_owner (`str`): this run's claim owner (`new_claim_owner()`); a `ClaimKeeper` must renew its leases.
        poller (`BatchCaptioner`, *optional*): collects open batches holding captions this run needs (the captioner
            itself when it is a `BatchCaptioner`); without one such captions stop the run with `OpenBatchError`.
        chunk_size (`int`, defaults to 256): units claimed and handed to a synchronous captioner at once.
        show_progress (`bool`, defaults to `True`): show a progress bar.
    """

    def __init__(
        self,
        captioner,
        rows: CaptionRows,
        cache: CaptionCache,
        ledger: SubmissionLedger,
        summary: CaptioningSummary,
        *,
        claim_owner: str,
        poller: BatchCaptioner | None = None,
        chunk_size: int = 256,
        show_progress: bool = True,
    ):
        self.captioner, self.rows, self.cache, self.ledger, self.summary = captioner, rows, cache, ledger, summary
        self.batch = captioner if isinstance(captioner, BatchCaptioner) else None
        self.poller = self.batch or poller
        self.claim_owner, self.chunk_size, self.show_progress = claim_owner, chunk_size, show_progress
        self.positions: dict[str, list[tuple[int, int]]] = {}
        for row, row_keys in enumerate(rows.keys):
            for s, key in enumerate(row_keys):
                if key:
                    self.positions.setdefault(key, []).append((row, s))
        cached = cache.get_many(self.positions)
        self.texts = [[cached.get(key) if key else None for key in row_keys] for row_keys in rows.keys]
        summary.cache_hits += sum(text is not None for row in self.texts for text in row)
        self.reasons: dict[tuple[int, int], str] = {}
        self.unreadable: dict[int, str] = {}
        for row, digest in enumerate(rows.image_hashes):
            if digest is None:
                self._unreadable(row, f"the image in column {rows.image_column!r} is missing (None)")
        # the token limit of a request whose answer was cut, raised for its next pass (a `TokenLimitedCaptioner`'s)
        self.max_tokens = captioner.max_tokens if isinstance(captioner, TokenLimitedCaptioner) else None
        self.token_limits: dict[str, int] = {}
        self.bar = None

    # ------------------------------------------------------------------ bookkeeping
    def missing(self) -> int:
        return sum(text is None for row in self.texts for text in row)

    def _fill(self, key: str, caption: str) -> int:
        filled = 0
        for row, s in self.positions.get(key, ()):
            if self.texts[row][s] is None:
                self.texts[row][s] = caption
                self.reasons.pop((row, s), None)
                filled += 1
        if filled and self.bar is not None:
            self.bar.update(filled)
        return filled

    def _fail(self, keys: Iterable[str], reason: str) -> None:
        for key in keys:
            for row, s in self.positions.get(key, ()):
                if self.texts[row][s] is None:
                    self.reasons[(row, s)] = reason

    def _missing_keys(self, unit: RequestUnit) -> list[str]:
        return [key for key in unit.keys if any(self.texts[r][s] is None for r, s in self.positions.get(key, ()))]

    def _handle(self, custom_id: str, record: dict, result: CaptionResult) -> None:
        """Stores one answer (from any backend) to the unit `custom_id`, fills the rows it serves and counts it; an
        answer cut by the token limit gets its unit a raised limit for the next pass."""
        answer = store_answer(self.cache, self.ledger, record, result)
        self.summary.account(result)
        for reason in [*result.rejected, *answer.rejected]:  # answers the backend asked again, then this one
            kind = reason_kind(reason)
            self.summary.rejected[kind] = self.summary.rejected.get(kind, 0) + 1
            self.summary.cut += is_cut(reason)
        if self.max_tokens is not None and any(is_cut(reason) for reason in answer.rejected):
            limit = result.max_tokens or self.token_limits.get(custom_id, self.max_tokens)
            self.token_limits[custom_id] = raised_token_limit(limit, self.max_tokens)
        for key, caption in answer.captions.items():
            self._fill(key, caption)
        missing = [entry["key"] for entry in record["entries"] if entry["key"] not in answer.captions]
        if missing:
            self._fail(missing, answer.problem)
            self.cache.release(self.claim_owner, missing)  # free for another run (or the next pass) to try

    def _unreadable(self, row: int, problem: str) -> None:
        """Reports every caption of a row whose image is missing or cannot be read (never requested, nor retried)."""
        self.unreadable[row] = f"{problem}; fix the image or drop the row (the other rows are unaffected)"
        self.reasons.update({(row, s): self.unreadable[row] for s in range(len(self.rows.slots))})

    def _image(self, row: int, retry: bool, images: dict):
        """The row's image (loaded once per chunk), or `None` when it cannot be read (reported, never retried)."""
        if row not in images and row not in self.unreadable:
            try:
                images[row] = self.rows.load_image(row, retry)
            except IMAGE_DECODE_ERRORS as error:
                column = self.rows.image_column
                self._unreadable(
                    row, f"the image in column {column!r} cannot be read ({type(error).__name__}: {error})"
                )
                self.cache.release(self.claim_owner, [key for key in self.rows.keys[row] if key])
        return images.get(row)

    def _request(self, unit: RequestUnit, image) -> CaptionRequest:
        """The request of `unit` with its image, at the raised token limit if an earlier answer to it was cut."""
        return CaptionRequest(image, unit.prompt, unit.response_format, self.token_limits.get(unit.custom_id))

    # ------------------------------------------------------------------ passes
    def run(self, max_passes: int, one_request_per_image: bool = False) -> None:
        """Runs up to `max_passes` passes over the missing captions (one more, first, for joint requests)."""
        with tqdm(
            total=self.missing() - len(self.unreadable) * len(self.rows.slots),
            unit="caption",
            desc="Captioning",
            disable=not self.show_progress or not self.missing(),
        ) as self.bar:
            first_retry = 2 if one_request_per_image else 1
            for pass_index in range(max_passes + (1 if one_request_per_image else 0)):
                joint = one_request_per_image and pass_index == 0
                units = build_units(self.rows, self.texts, joint, self.unreadable)
                if not units:
                    break
                self.summary.passes += 1
                use_batch = self.batch is not None and (pass_index == 0 or self.batch.retry_failed == "batch")
                self._run_units(units, retry=pass_index >= first_retry, use_batch=use_batch)
        self.bar = None

    def _run_units(self, units: list[RequestUnit], *, retry: bool, use_batch: bool) -> None:
        """Claims, sends (or collects from open batches) and stores `units`; waits for those others are making."""
        queue = units
        while queue:
            waiting = []
            step = len(queue) if use_batch else self.chunk_size
            for start in range(0, len(queue), step):
                mine, theirs = self._claim(queue[start : start + step])
                waiting += theirs
                adopted, to_send = self._split_open_batches(mine)
                if adopted:
                    self._collect(adopted)
                if to_send and use_batch:
                    self._collect(self._submit(to_send, retry))
                elif to_send:
                    self._send(to_send, retry)
            queue = [unit for unit in waiting if self._missing_keys(unit)]
            if queue:  # only captions others are making are left: look again in a moment
                if self.bar is not None:
                    self.bar.set_postfix(waiting_for_another_run=len(queue))
                time.sleep(CLAIM_POLL_S)

    def _claim(self, units: list[RequestUnit]) -> tuple[list[RequestUnit], list[RequestUnit]]:
        """Splits units into those this run claimed every missing caption of (to send) and those another run (or an
        open batch it polls) is making; captions stored meanwhile are read from the cache."""
        needed = {id(unit): self._missing_keys(unit) for unit in units}
        granted = self.cache.claim([key for keys in needed.values() for key in keys], self.claim_owner, CLAIM_TTL_S)
        mine, theirs = [], []
        for unit in units:
            keys = needed[id(unit)]
            if not keys:
                continue
            (mine if all(key in granted for key in keys) else theirs).append(unit)
        partly = [key for unit in theirs for key in needed[id(unit)] if key in granted]
        if partly:
            self.cache.release(self.claim_owner, partly)
        stored = self.cache.get_many(key for unit in theirs for key in needed[id(unit)])
        for key, caption in stored.items():
            self.summary.from_other_runs += self._fill(key, caption)
        return mine, [unit for unit in theirs if self._missing_keys(unit)]

    def _split_open_batches(self, units: list[RequestUnit]) -> tuple[list[dict], list[RequestUnit]]:
        """The open batches (ledger submissions) holding captions of `units`, and the units none holds."""
        if not units:
            return [], []
        holders = self.ledger.open_submissions_holding(BATCH_KIND, {key for unit in units for key in unit.keys})
        if not holders:
            return [], units
        held = set().union(*(submission["keys"] for submission in holders))
        endpoint = self.poller.batch_endpoint() if self.poller is not None else None
        foreign = [s for s in holders if (s["info"].get("endpoint") or s["info"].get("base_url")) != endpoint]
        if foreign:
            where = foreign[0]["info"].get("endpoint") or foreign[0]["info"].get("base_url")
            raise OpenBatchError(
                f"{len(held)} caption(s) this run needs are in {len(foreign)} open batch(es) at {where} (batch "
                f"{foreign[0]['remote_id'] or foreign[0]['id']}), submitted by an earlier run that stopped; paying "
                f"for them again is avoided. Collect them by running the same command with --captioner "
                f"openai-batch:MODEL --base_url {where} (the batch is polled, not resubmitted), or cancel them with "
                "mmft_hf.captioning.engine.cancel_open_batches."
            )
        logger.info(
            "Collecting %d open batch(es) recorded in the cache; not requesting their captions again.", len(holders)
        )
        return holders, [unit for unit in units if not set(unit.keys) & held]

    # ------------------------------------------------------------------ synchronous backends
    def _send(self, units: list[RequestUnit], retry: bool) -> None:
        images, requests, sent = {}, [], []
        for unit in units:
            image = self._image(unit.row, retry, images)
            if image is not None:
                requests.append(self._request(unit, image))
                sent.append(unit)
        answered = set()
        # No try/except: an authentication error (or any exception) from the backend propagates at once; every
        # caption received so far is already committed.
        for index, result in self.captioner.caption(requests):
            if not 0 <= index < len(sent) or index in answered:
                raise RuntimeError(f"The captioner yielded an invalid or repeated index {index!r}.")
            answered.add(index)
            self._handle(sent[index].custom_id, sent[index].record, result)
        for index in set(range(len(sent))) - answered:
            self._fail(sent[index].keys, "the captioner returned no result for this request")
            self.cache.release(self.claim_owner, sent[index].keys)

    # ------------------------------------------------------------------ batch backends
    def _submit(self, units: list[RequestUnit], retry: bool) -> list[dict]:
        """Writes units as request files within the batch limits, records each in the ledger, then starts its batch."""
        batch, submissions = self.batch, []
        for path, records in self._request_files(units, retry):
            try:
                file_id = batch.upload_requests(path)
            finally:
                os.remove(path)
            info = {"endpoint": batch.batch_endpoint(), "requests": len(records)}
            self.ledger.record(file_id, BATCH_KIND, records, info)  # recorded before the batch exists
            remote_id = batch.start_batch(file_id)
            self.ledger.set_remote_id(file_id, remote_id)
            submissions.append({"id": file_id, "remote_id": remote_id, "info": info, "custom_ids": set(records)})
        return submissions

    def _request_files(self, units: list[RequestUnit], retry: bool):
        """Yields `(path, records)` per request file; units that cannot be written are reported here."""
        batch, handle, path, records, size, images = self.batch, None, None, {}, 0, {}
        try:
            for unit in units:
                if unit.row not in images:
                    images.clear()  # units come row by row: keep one decoded image at a time
                image = self._image(unit.row, retry, images)
                if image is None:
                    continue
                data = (batch.request_line(unit.custom_id, self._request(unit, image)) + "\n").encode("utf-8")
                if len(data) > batch.max_batch_file_bytes:
                    self._fail(unit.keys, f"the request is {len(data)} bytes, over max_batch_file_bytes="
                               f"{batch.max_batch_file_bytes}; lower max_image_side")  # fmt: skip
                    self.cache.release(self.claim_owner, unit.keys)
                    continue
                if handle is not None and (
                    len(records) >= batch.max_requests_per_batch or size + len(data) > batch.max_batch_file_bytes
                ):
                    handle.close()
                    yield path, records
                    handle, records, size = None, {}, 0
                if handle is None:
                    descriptor, path = tempfile.mkstemp(prefix="mmft-hf-batch-", suffix=".jsonl")
                    handle = os.fdopen(descriptor, "wb")
                handle.write(data)
                size += len(data)
                records[unit.custom_id] = unit.record
            if handle is not None:
                handle.close()
                yield path, records
        finally:
            if handle is not None and not handle.closed:
                handle.close()
                os.remove(path)

    def _collect(self, submissions: list[dict]) -> None:
        """Polls open batches until each ends, then stores every line of their results and closes them."""
        poller = self.poller
        for submission in submissions:
            if submission["remote_id"] is None:  # an earlier run stopped between upload and batch creation
                submission["remote_id"] = poller.start_batch(submission["id"])
                self.ledger.set_remote_id(submission["id"], submission["remote_id"])
        waiting, started = list(submissions), time.monotonic()
        while waiting:
            statuses = []
            for submission in list(waiting):
                status = poller.batch_status(submission["remote_id"])
                statuses.append(status.status)
                if not status.ended:
                    continue
                waiting.remove(submission)
                records = self.ledger.units(submission["custom_ids"])
                answered = set()
                for number, line in enumerate(poller.result_lines(status), start=1):
                    if not line.strip():
                        continue
                    try:
                        custom_id, result = parse_output_line(line)
                    except ValueError as error:
                        logger.warning("Batch %s, result line %d: %s", status.batch_id, number, error)
                        continue
                    if custom_id not in records or custom_id in answered:
                        logger.warning(
                            "Batch %s, result line %d: unexpected custom_id %r.", status.batch_id, number, custom_id
                        )
                        continue
                    answered.add(custom_id)
                    self._handle(custom_id, records[custom_id], result)
                reason = f"batch {status.batch_id} ended {status.status!r} without a result for this request"
                reason += f": {status.note}" if status.note else ""
                for custom_id in sorted(set(records) - answered):
                    self._handle(
                        custom_id, records[custom_id], CaptionResult(text=None, error=reason, processed=False)
                    )
                self.ledger.close_submission(submission["id"], status.status)
            if self.bar is not None:
                self.bar.set_postfix(
                    batches=",".join(sorted(set(statuses))), open=len(waiting),
                    elapsed=f"{time.monotonic() - started:.0f}s",
                )  # fmt: skip
            if waiting:  # quick looks at first (a batch that ends at once), then every `poll_interval_s`
                time.sleep(min(poller.poll_interval_s, max(0.05, 0.25 * (time.monotonic() - started))))

    # ------------------------------------------------------------------ offline engines
    def write_requests(self, path: str, one_request_per_image: bool = False) -> dict[str, dict]:
        """Writes the request line of every missing caption to `path` (Batch API JSONL, for an offline engine), as a
        first pass would send them; rows whose image is missing or cannot be read are reported (`failures`).

        Args:
            path (`str`): the file to write (replaced).
            one_request_per_image (`bool`, defaults to `False`): one joint request per image and copy.

        Returns:
            `dict[str, dict]`: the record of each request written, by `custom_id`.
        """
        records, images = {}, {}
        with open(path, "w", encoding="utf-8") as handle:
            for unit in build_units(self.rows, self.texts, one_request_per_image, self.unreadable):
                if unit.row not in images:
                    images.clear()  # units come row by row: keep one decoded image at a time
                image = self._image(unit.row, False, images)
                if image is not None:
                    handle.write(self.batch.request_line(unit.custom_id, self._request(unit, image)) + "\n")
                    records[unit.custom_id] = unit.record
        return records

    # ------------------------------------------------------------------ the end
    def failures(self) -> tuple[list[CaptionFailure], list[CaptionFailure]]:
        """The captions still missing: `(for server or answer reasons, for unreadable or missing images)`."""
        server, images = [], []
        for row, row_texts in enumerate(self.texts):
            for s, text in enumerate(row_texts):
                if text is None:
                    failure = CaptionFailure(
                        self.rows.first_row + row, self.rows.slots[s][0], self.rows.slots[s][1],
                        self.reasons.get((row, s), "not requested"),
                    )  # fmt: skip
                    (images if row in self.unreadable else server).append(failure)
        return server, images


def cancel_open_batches(captioner: BatchCaptioner, cache_dir: str | None = None) -> list[str]:
    """Asks the provider to cancel every batch of `captioner`'s endpoint that the caption cache records as open.

    Use it to stop paying for a submission you no longer want. What the batches finished before the cancellation is
    still paid for: the next `caption_dataset` run collects it (and stores it) as usual, and requests only what is
    then missing.

    Args:
        captioner (`BatchCaptioner`): e.g. an `OpenAIBatchCaptioner` for the provider the batches went to.
        cache_dir (`str`, *optional*): the caption cache (see `caption_dataset`).

    Returns:
        `list[str]`: the ids of the batches asked to cancel.
    """
    from .cache import default_cache_dir

    cancelled = []
    with (
        CaptionCache(cache_dir if cache_dir is not None else default_cache_dir()) as cache,
        SubmissionLedger(cache) as ledger,
    ):
        for submission in ledger.open_submissions(BATCH_KIND):
            where = submission["info"].get("endpoint") or submission["info"].get("base_url")
            if submission["remote_id"] and where == captioner.batch_endpoint():
                captioner.cancel_batch(submission["remote_id"])
                cancelled.append(submission["remote_id"])
    return cancelled
