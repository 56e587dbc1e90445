"""Captioning at scale: one request per image for every caption type, and batch engines (Batch APIs, export files).

`caption_dataset` runs these passes before its usual per-type passes when `one_request_per_image=True` or when
the captioner submits batches (`OpenAIBatchCaptioner`, the exporter of `export_caption_requests`). Both are
organised around *request units*: one request, the captions its answer fills (one for a per-type request, one per
caption type for a joint request) and its `custom_id`. Every answer goes through `store_answer`, which commits
its captions to the cache as it is read, so batch results, imported results and synchronous joint answers are
stored the same way, under the same per-type keys as a plain run uses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tqdm.auto import tqdm

from .batch_files import not_sent
from .cache import CaptionCache, caption_key
from .captioners.base import CaptionRequest, CaptionResult
from .joint import build_joint_prompt, joint_response_format, parse_joint_reply
from .ledger import SubmissionLedger

logger = logging.getLogger(__name__)

JOINT = "joint"


@dataclass
class RequestUnit:
    """One request of a pass and where its answer goes.

    Args:
        custom_id (`str`): the cache key of its caption, or for a joint request the key of the joint prompt.
        row (`int`): the row (in the rows being captioned) whose image it sends.
        targets (`list[int]`): the caption slots (indices into the row's type-major slots) its answer fills.
        prompt (`str`): the prompt sent.
        response_format (`dict`, *optional*): the JSON schema of a joint request.
        record (`dict`): the JSON-ready description kept in the ledger: `joint`, `prompt` and the cache `entries`
            (key, caption type, image hash, per-type prompt, identity, slot) of its captions.
    """

    custom_id: str
    row: int
    targets: list[int]
    prompt: str
    response_format: dict | None
    record: dict


@dataclass
class PassState:
    """What `caption_dataset` knows about the rows being captioned, shared with the passes run here.

    Args:
        keys (`list[list[str | None]]`): the cache key per row and slot (`None` for a missing image).
        prompts (`list[list[str]]`): the per-type prompt per row and slot.
        image_hashes (`list[str | None]`): the sha256 of each row's image bytes.
        slots (`list[tuple[str, int]]`): (caption type, copy) per slot, type-major.
        identity_text (`str`): the captioner identity as in the cache keys.
        texts (`list[list[str | None]]`): the captions so far, updated in place.
        reasons (`dict`): `(row, slot) -> why it is missing`, updated in place.
        summary (`CaptioningSummary`): counters, updated in place.
        load_image (`Callable[[int, bool], PIL.Image.Image]`): loads a row's image (resized for a retry when the
            flag is set); raises on an unreadable image.
        unreadable_errors (`tuple[type, ...]`): the exceptions `load_image` raises for an unreadable image.
        chunk_size (`int`): requests handed to a synchronous captioner at once.
        claim_owner (`str`, *optional*): the run's claim owner (see `CaptionCache.claim`): each request's captions
            are claimed before it is sent, so that two runs sharing the cache never pay twice. `None` claims nothing.
        claim_ttl_s (`float`, defaults to 60.0): the claims' lease (the run's `ClaimKeeper` renews them).
    """

    keys: list
    prompts: list
    image_hashes: list
    slots: list
    identity_text: str
    texts: list
    reasons: dict
    summary: object
    load_image: Callable
    unreadable_errors: tuple
    chunk_size: int = 256
    claim_owner: str | None = None
    claim_ttl_s: float = 60.0


def row_image_loader(raw, image_column: str, mode: str | None, retry_resize: tuple[int, int] | None, seed: int):
    """A `load_image(row, retry)` for `PassState`: decodes a row of `raw` (images not decoded), converts it to the
    feature's `mode`, and for a retry resizes it to a random square side in `retry_resize`, like `caption_dataset`."""
    import random

    from ..images import load_image

    rng = random.Random(seed)

    def load(row: int, retry: bool):
        image = load_image(raw[row][image_column])
        if mode and image.mode != mode:
            image = image.convert(mode)
        if retry and retry_resize:
            side = rng.randrange(*retry_resize)
            image = image.resize((side, side))
        return image

    return load


def build_units(state: PassState, joint: bool) -> list[RequestUnit]:
    """The request units for every missing caption: per type, or one per image and copy when `joint`."""
    units = []
    for row, digest in enumerate(state.image_hashes):
        if not digest:
            continue
        missing = [s for s, text in enumerate(state.texts[row]) if text is None]
        groups = {}
        for s in missing:
            groups.setdefault(state.slots[s][1] if joint else (s,), []).append(s)
        for group in groups.values():
            entries = [
                {
                    "key": state.keys[row][s],
                    "caption_type": state.slots[s][0],
                    "image_sha256": digest,
                    "prompt": state.prompts[row][s],
                    "identity": state.identity_text,
                    "slot": state.slots[s][1],
                }
                for s in group
            ]
            if len(group) == 1:  # a single missing type is asked for with its own prompt, joint mode or not
                prompt, custom_id, response_format = entries[0]["prompt"], entries[0]["key"], None
                record = {JOINT: False, "prompt": prompt, "entries": entries}
            else:
                prompt = build_joint_prompt({entry["caption_type"]: entry["prompt"] for entry in entries})
                custom_id = caption_key(digest, prompt, state.identity_text, entries[0]["slot"])
                response_format = joint_response_format([entry["caption_type"] for entry in entries])
                record = {JOINT: True, "prompt": prompt, "entries": entries}
            units.append(RequestUnit(custom_id, row, group, prompt, response_format, record))
    return units


def store_answer(
    cache: CaptionCache, ledger: SubmissionLedger, record: dict, result: CaptionResult
) -> dict[str, str | None]:
    """Commits the captions of one answer to the cache and returns them per key (`None` where there is none).

    A joint answer is parsed into its caption types; each caption found is stored under its per-type key, with
    its origin (the joint prompt and the request's token usage) in the ledger's `caption_origins`.

    Args:
        cache (`CaptionCache`): where the captions go.
        ledger (`SubmissionLedger`): where joint origins go.
        record (`dict`): the unit's record (see `RequestUnit`).
        result (`CaptionResult`): the answer.

    Returns:
        `dict[str, str | None]`: key -> the stored caption; plus, under `""`, why captions are missing (if so).
    """
    entries = record["entries"]
    text = (result.text or "").strip()
    if not text:
        return {**{entry["key"]: None for entry in entries}, "": result.error or "the captioner returned no caption"}
    if record[JOINT]:
        found, problem = parse_joint_reply(text, [entry["caption_type"] for entry in entries])
    else:
        found, problem = {entries[0]["caption_type"]: text}, ""
    stored = {}
    for entry in entries:
        caption = found.get(entry["caption_type"])
        stored[entry["key"]] = caption
        if caption is None:
            continue
        fields = {name: entry[name] for name in ("image_sha256", "prompt", "identity", "slot")}
        cache.put(entry["key"], caption, usage={} if record[JOINT] else result.usage, **fields)
        if record[JOINT]:
            origin = {"request": JOINT, "prompt": record["prompt"], "usage": result.usage}
            ledger.set_origin(entry["key"], origin)
    if problem:
        stored[""] = problem
    return stored


OTHER_RUN = (
    "another run sharing this cache holds its claim (it is requesting this caption now); rerun later to read it "
    "from the cache"
)


def _claim_units(cache: CaptionCache, state: PassState, units: list[RequestUnit]) -> tuple[list, list]:
    """Splits units into those whose captions this run claimed (to send) and those another run is making."""
    if state.claim_owner is None or not units:
        return units, []
    keys_of = {unit.custom_id: [entry["key"] for entry in unit.record["entries"]] for unit in units}
    granted = cache.claim([key for keys in keys_of.values() for key in keys], state.claim_owner, state.claim_ttl_s)
    mine, others = [], []
    for unit in units:
        (mine if all(key in granted for key in keys_of[unit.custom_id]) else others).append(unit)
    partly = [key for unit in others for key in keys_of[unit.custom_id] if key in granted]
    if partly:
        cache.release(state.claim_owner, partly)
    return mine, others


def _read_others(cache: CaptionCache, state: PassState, others: list[RequestUnit]) -> None:
    """Reads the captions of units another run was making from the cache; the rest stay missing, with the reason."""
    stored = cache.get_many(entry["key"] for unit in others for entry in unit.record["entries"])
    for unit in others:
        for s in unit.targets:
            caption = stored.get(state.keys[unit.row][s])
            if caption is not None:
                state.texts[unit.row][s] = caption
                state.reasons.pop((unit.row, s), None)
                state.summary.from_other_runs += 1
            else:
                state.reasons[(unit.row, s)] = OTHER_RUN


def _split_duplicates(units: list[RequestUnit]) -> tuple[list[RequestUnit], list[tuple[RequestUnit, RequestUnit]]]:
    """One unit per `custom_id` (rows with identical image bytes and prompts share their captions' keys, and a
    batch file needs distinct ids); the others, each with the unit that is sent for it."""
    first: dict[str, RequestUnit] = {}
    duplicates = []
    for unit in units:
        if unit.custom_id in first:
            duplicates.append((unit, first[unit.custom_id]))
        else:
            first[unit.custom_id] = unit
    return list(first.values()), duplicates


def _copy_duplicates(cache: CaptionCache, state: PassState, duplicates: list) -> None:
    """Gives duplicate units the captions (or the failure reasons) of the unit sent for them."""
    stored = cache.get_many(state.keys[unit.row][s] for unit, _ in duplicates for s in unit.targets)
    for unit, sent in duplicates:
        for s in unit.targets:
            caption = stored.get(state.keys[unit.row][s])
            if caption is not None:
                state.texts[unit.row][s] = caption
                state.reasons.pop((unit.row, s), None)
            else:
                state.reasons[(unit.row, s)] = state.reasons.get((sent.row, s), "no caption in the answer")


def _account(summary, result: CaptionResult) -> None:
    if not getattr(result, "sent", True):
        return
    summary.requests += 1
    summary.retries += int(result.retries or 0)
    for name, value in (result.usage or {}).items():
        if isinstance(value, (int, float)):
            summary.usage[name] = summary.usage.get(name, 0) + value


def _apply(state: PassState, unit: RequestUnit, stored: dict) -> int:
    """Copies one stored answer into the pass state; returns how many of its captions are still missing."""
    still_missing = 0
    for s in unit.targets:
        caption = stored.get(state.keys[unit.row][s])
        if caption is not None:
            state.texts[unit.row][s] = caption
            state.reasons.pop((unit.row, s), None)
        else:
            state.reasons[(unit.row, s)] = stored.get("") or "no caption in the answer"
            still_missing += 1
    return still_missing


def _sync_results(captioner, state: PassState, units: list[RequestUnit], retry: bool) -> Iterator[tuple[str, object]]:
    """Runs units through the captioner's synchronous `caption`, chunk by chunk; yields (custom_id, result)."""
    for start in range(0, len(units), state.chunk_size):
        chunk, images = units[start : start + state.chunk_size], {}
        requests, sent = [], []
        for unit in chunk:
            if unit.row not in images:
                try:
                    images[unit.row] = state.load_image(unit.row, retry)
                except state.unreadable_errors as error:
                    images[unit.row] = f"the image cannot be read ({type(error).__name__}: {error})"
            if isinstance(images[unit.row], str):
                yield unit.custom_id, not_sent(images[unit.row])
                continue
            requests.append(CaptionRequest(images[unit.row], unit.prompt, unit.response_format))
            sent.append(unit)
        for index, result in captioner.caption(requests):
            yield sent[index].custom_id, result


def run_scale_passes(
    captioner,
    state: PassState,
    cache: CaptionCache,
    *,
    one_request_per_image: bool,
    max_passes: int,
    show_progress: bool = True,
) -> int:
    """Runs the joint and batch passes of `caption_dataset`; returns how many synchronous passes they replace.

    Pass 0 sends one request per image and copy when `one_request_per_image` (a single missing type gets its
    per-type prompt), through the batch engine when the captioner submits batches, else synchronously. Later passes
    are per type; they run here only for a batch captioner whose `retry_failed` is `"batch"` (a new batch with
    what failed). `caption_dataset` runs its synchronous per-type passes for the passes left over.

    Args:
        captioner: the captioner; `submits_batches = True` marks a batch engine with `submit_and_collect`.
        state (`PassState`): the rows, their keys and captions so far (updated in place).
        cache (`CaptionCache`): the open caption cache.
        one_request_per_image (`bool`): ask for every caption type in one request on the first pass.
        max_passes (`int`): the pass budget of the whole call.
        show_progress (`bool`, defaults to `True`): show progress bars.

    Returns:
        `int`: how many of `max_passes` were used here: 0 after a synchronous joint pass (it comes on top), the
        batch passes made with `retry_failed="sync"`, and `max_passes` when the batch engine retries in new
        batches itself (or only exports requests), so that no synchronous pass follows.
    """
    batching = getattr(captioner, "submits_batches", False)
    retry_in_batches = batching and getattr(captioner, "retry_failed", "batch") == "batch"
    used = 0
    with SubmissionLedger(cache) as ledger:
        for pass_index in range(max_passes):
            joint = one_request_per_image and pass_index == 0
            if pass_index and not retry_in_batches:
                break
            if not (joint or batching):
                break
            (units, duplicates), others = _split_duplicates(build_units(state, joint)), []

            def claim(candidates: list[RequestUnit], others: list = others) -> list[RequestUnit]:
                mine, theirs = _claim_units(cache, state, candidates)
                others.extend(theirs)
                return mine

            if not batching:
                units = claim(units)
            used = pass_index + 1
            if not units:
                _read_others(cache, state, others)
                _copy_duplicates(cache, state, duplicates)
                break
            state.summary.passes += 1
            by_id = {unit.custom_id: unit for unit in units}
            if batching:  # the engine claims only what it is about to submit: open batches are adopted, not claimed
                results = captioner.submit_and_collect(
                    units, lambda row, retry=pass_index > 0: state.load_image(row, retry), ledger, show_progress, claim
                )
            else:
                results = _sync_results(captioner, state, units, pass_index > 0)
            answered, failed = set(), 0
            with tqdm(
                total=len(units), unit="req", desc="Joint requests", disable=batching or not show_progress
            ) as bar:
                for custom_id, result in results:
                    unit = by_id.get(custom_id)
                    record = unit.record if unit is not None else ledger.units([custom_id]).get(custom_id)
                    if record is None:
                        logger.warning("Ignoring a batch result for the unknown custom_id %r.", custom_id)
                        continue
                    stored = store_answer(cache, ledger, record, result)
                    if unit is None or custom_id in answered:  # a result for another run's request: stored only
                        continue
                    answered.add(custom_id)
                    _account(state.summary, result)
                    failed += _apply(state, unit, stored) > 0
                    bar.update(1)
                    bar.set_postfix(failed=failed, refresh=False)
            for custom_id in by_id.keys() - answered:
                unit = by_id[custom_id]
                reason = getattr(captioner, "unanswered_reason", "the captioner returned no result for this request")
                for s in unit.targets:
                    state.reasons[(unit.row, s)] = reason
            _read_others(cache, state, others)
            _copy_duplicates(cache, state, duplicates)
    if not batching:
        return 0  # the joint pass comes on top: every per-type pass of `max_passes` is left for what it missed
    if retry_in_batches or getattr(captioner, "retry_failed", None) is None:
        return max_passes  # the engine retried in new batches (or only exports): no synchronous pass
    return used
