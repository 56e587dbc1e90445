"""Offline engines: export the missing captions' requests as Batch API JSONL, import the engine's results.

Any engine that reads the OpenAI Batch API format can then write the captions: `vllm run-batch` on one GPU node or
several (split the file, see docs/scaling.md), a provider's batch console, or a script of your own. The caption
cache stays the single source of truth: the export records every `custom_id` (the cache key) in the cache, the
import validates each result line against that record before storing it, and afterwards `caption_dataset` with the
same settings finds every imported caption and makes no request for it.

```python
captioner = OpenAICompatibleCaptioner("Qwen/Qwen3-VL-8B-Instruct", api_key_env=None)  # the model vLLM serves
export_caption_requests(dataset, "requests.jsonl", captioner, domain="textures")
# vllm run-batch -i requests.jsonl -o results.jsonl --model Qwen/Qwen3-VL-8B-Instruct
print(import_caption_results("results.jsonl"))
captioned = caption_dataset(dataset, captioner, domain="textures")  # zero requests for the imported captions
```
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field

import datasets

from .batch_files import parse_output_line
from .cache import CaptionCache, default_cache_dir, new_claim_owner
from .caption import caption_rows, caption_settings, check_settings, shard_bounds
from .captioners.base import CaptionResult
from .captioners.openai_batch import as_batch_captioner
from .engine import (
    EXPORT_KIND,
    CaptionEngine,
    CaptionFailure,
    CaptioningSummary,
    log_failures,
    reason_kind,
    store_answer,
)
from .ledger import SubmissionLedger
from .prompts import CAPTION_TYPES, DEFAULT_WORDS, PROMPT_TEMPLATE

SHOWN = 10  # bad lines listed per kind in an import report; the rest are counted ("... and N more")


def _listed(items: list, render) -> str:
    text = "".join(f"\n  {render(item)}" for item in items[:SHOWN])
    if len(items) > SHOWN:
        text += f"\n  ... and {len(items) - SHOWN} more"
    return text


@dataclass
class ExportSummary:
    """What `export_caption_requests` wrote.

    Args:
        path (`str`): the request file.
        requests (`int`): request lines written.
        captions (`int`): captions those requests fill (more than `requests` with `one_request_per_image`).
        cache_hits (`int`): captions already in the cache, not exported.
        failures (`list[CaptionFailure]`): captions not exported because their row's image is missing or cannot be
            read: row, caption type, slot and what to do, exactly as `caption_dataset` reports them.
    """

    path: str
    requests: int = 0
    captions: int = 0
    cache_hits: int = 0
    failures: list[CaptionFailure] = field(default_factory=list)

    def __str__(self) -> str:
        text = (
            f"Wrote {self.requests} request(s) for {self.captions} caption(s) to {self.path} ({self.cache_hits} "
            "caption(s) already cached)."
        )
        if self.failures:
            text += f" {len(self.failures)} caption(s) not written:" + _listed(self.failures, str)
        return text


@dataclass
class ImportReport:
    """What `import_caption_results` did with each line of a result file.

    Args:
        path (`str`): the result file.
        lines (`int`): non-empty lines read.
        captions_stored (`int`): captions committed to the cache by this import.
        already_cached (`int`): captions of answered lines that the cache already held with the same text.
        conflicts (`list[tuple[int, str]]`): `(line number, custom_id)` of lines whose caption differs from the
            one the cache already holds for it (e.g. a duplicate line with other text): the cached caption is kept.
        failed (`list[tuple[int, str, str]]`): `(line number, custom_id, reason)` of lines without a usable answer
            (an engine error, or an answer the quality gate rejected: empty, refused, cut, absurdly long).
        rejected (`dict[str, int]`): answers the quality gate rejected, by reason (also listed in `failed`).
        unknown (`list[tuple[int, str]]`): `(line number, custom_id)` of lines whose `custom_id` no export or batch
            of this cache holds: never stored.
        malformed (`list[tuple[int, str]]`): `(line number, reason)` of lines that are not valid result lines.
        usage (`dict[str, int]`): the token counts the engine reported, summed over the known lines it ran.
    """

    path: str
    lines: int = 0
    captions_stored: int = 0
    already_cached: int = 0
    conflicts: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    rejected: dict = field(default_factory=dict)
    unknown: list = field(default_factory=list)
    malformed: list = field(default_factory=list)
    usage: dict = field(default_factory=dict)

    def __str__(self) -> str:
        text = (
            f"Imported {self.path}: {self.lines} line(s), {self.captions_stored} caption(s) stored, "
            f"{self.already_cached} already cached, {len(self.conflicts)} conflicting, {len(self.failed)} failed"
            + (f" (rejected by the quality gate: {self.rejected})" if self.rejected else "")
            + f", {len(self.unknown)} unknown custom_id(s), {len(self.malformed)} malformed"
            + (f"; tokens {self.usage}" if self.usage else "")
            + "."
        )
        text += _listed(self.failed, lambda item: f"line {item[0]} ({item[1][:16]}...): failed: {item[2]}")
        text += _listed(
            self.conflicts,
            lambda item: (
                f"line {item[0]} ({item[1][:16]}...): conflict: the cache already holds another caption "
                "for it (kept; this line's text is not stored)"
            ),
        )
        text += _listed(
            self.unknown,
            lambda item: (
                f"line {item[0]}: unknown custom_id {item[1]!r} (not exported from this cache; not stored. "
                "Import into the cache the requests were exported from.)"
            ),
        )
        text += _listed(self.malformed, lambda item: f"line {item[0]}: malformed: {item[1]}")
        if self.failed:
            text += "\nExport again (only the missing captions are written) or caption them with caption_dataset."
        return text


def export_caption_requests(
    dataset: datasets.Dataset,
    path: str,
    captioner,
    *,
    domain: str,
    caption_types=CAPTION_TYPES,
    captions_per_type: int = 1,
    image_column: str = "image",
    label_column: str = "label",
    class_names=None,
    prompt_template: str = PROMPT_TEMPLATE,
    words: int = DEFAULT_WORDS,
    cache_dir: str | None = None,
    num_shards: int = 1,
    shard_index: int = 0,
    one_request_per_image: bool = False,
) -> ExportSummary:
    """Writes the requests of every caption missing from the cache as Batch API JSONL, for an offline engine.

    The rows, keys and prompts are exactly those `caption_dataset` would request with the same arguments (so the
    same arguments must be given to it afterwards); `custom_id` is the cache key, `body` what `captioner` would send.
    Every request is recorded in the cache, so that `import_caption_results` can validate and store the answers.
    Exporting again writes the captions still missing. Rows whose image is missing (`None`) or cannot be read are
    reported in the summary's `failures` and in the log (row, caption type, what to do), as `caption_dataset`
    reports them; the other rows are written.

    Args:
        dataset (`datasets.Dataset`): the split to caption.
        path (`str`): the JSONL file to write (replaced if it exists).
        captioner (`OpenAICompatibleCaptioner`): the model name and generation settings the engine will use
            (`base_url` and the key are not used; `api_key_env=None` is fine).
        domain (`str`): the prompt's domain word.
        caption_types, captions_per_type, image_column, label_column, class_names, prompt_template, words, cache_dir,
            num_shards, shard_index, one_request_per_image: as for `caption_dataset`.

    Returns:
        `ExportSummary`: the file, how many requests and captions it holds, and the captions it could not hold.
    """
    if isinstance(captioner, (list, tuple)):
        raise TypeError(
            f"export_caption_requests takes one captioner, got a {type(captioner).__name__} of {len(captioner)}: "
            "export one requests file per captioner (each one's results import into the same cache)."
        )
    writer = as_batch_captioner(captioner)
    if writer is None:
        raise TypeError(
            "export_caption_requests needs an OpenAICompatibleCaptioner (or OpenAIBatchCaptioner) describing the "
            f"model and generation settings the engine will use; got {type(captioner).__name__}."
        )
    settings = caption_settings(
        domain=domain, caption_types=caption_types, captions_per_type=captions_per_type, image_column=image_column,
        label_column=label_column, class_names=class_names, prompt_template=prompt_template, words=words,
    )  # fmt: skip
    names = check_settings(dataset, captioner, settings)
    start, _ = shard_bounds(len(dataset), num_shards, shard_index)
    part = dataset.shard(num_shards, shard_index, contiguous=True) if num_shards > 1 else dataset
    rows = caption_rows(part, captioner, settings, names, first_row=start)
    summary, partial = ExportSummary(os.path.abspath(path)), os.path.abspath(path) + ".partial"
    os.makedirs(os.path.dirname(summary.path), exist_ok=True)
    with (
        CaptionCache(cache_dir if cache_dir is not None else default_cache_dir()) as cache,
        SubmissionLedger(cache) as ledger,
    ):
        # the engine's view of the rows: its cache hits, and its report of rows without a readable image
        engine = CaptionEngine(
            writer, rows, cache, ledger, CaptioningSummary(), claim_owner=new_claim_owner(), show_progress=False
        )
        records = engine.write_requests(partial, one_request_per_image)
        ledger.record(f"{EXPORT_KIND}:{uuid.uuid4().hex}", EXPORT_KIND, records, {"path": summary.path})
    os.replace(partial, summary.path)  # recorded in the ledger before the file appears under its name
    _, summary.failures = engine.failures()
    log_failures(summary.failures, f"not exported to {summary.path}")
    summary.cache_hits = engine.summary.cache_hits
    summary.requests = len(records)
    summary.captions = sum(len(record["entries"]) for record in records.values())
    return summary


def import_caption_results(path: str, cache_dir: str | None = None) -> ImportReport:
    """Reads a Batch API output (or error) file into the caption cache, line by line, validating each line.

    A line is stored only if its `custom_id` was exported (or submitted as a batch) from this cache, and only if the
    quality gate accepts its answer: its captions then go under the per-type keys the export recorded, so
    `caption_dataset` with the export's settings finds them. Unknown `custom_id`s and malformed lines are reported,
    never stored; failed requests and rejected answers (empty, refused, cut by the token limit, absurdly long) are
    reported and stay missing; a line whose caption differs from the one already cached is reported as a conflict
    (the cached caption is kept). Importing a file twice stores nothing new.

    Args:
        path (`str`): the result JSONL, e.g. from `vllm run-batch -o` (several files: call once per file).
        cache_dir (`str`, *optional*): the caption cache the requests were exported from (see `caption_dataset`).

    Returns:
        `ImportReport`: counts, and every failed, conflicting, unknown or malformed line with its number.
    """
    report = ImportReport(os.path.abspath(path))
    parsed: list[tuple[int, str, CaptionResult]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            report.lines += 1
            try:
                parsed.append((number, *parse_output_line(line)))
            except ValueError as error:
                report.malformed.append((number, str(error)))
    with CaptionCache(cache_dir if cache_dir is not None else default_cache_dir()) as cache:
        with SubmissionLedger(cache) as ledger:
            records = ledger.units(custom_id for _, custom_id, _ in parsed)
            for number, custom_id, result in parsed:
                record = records.get(custom_id)
                if record is None:
                    report.unknown.append((number, custom_id))
                    continue
                answer = store_answer(cache, ledger, record, result)
                if result.processed:
                    for name, value in result.usage.items():
                        report.usage[name] = report.usage.get(name, 0) + value
                for reason in answer.rejected:
                    report.rejected[reason_kind(reason)] = report.rejected.get(reason_kind(reason), 0) + 1
                report.captions_stored += answer.new
                report.already_cached += len(answer.captions) - answer.new - len(answer.conflicts)
                if answer.conflicts:
                    report.conflicts.append((number, custom_id))
                if answer.problem:
                    report.failed.append((number, custom_id, answer.problem))
    return report
