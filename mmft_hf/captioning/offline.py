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

import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import datasets
from tqdm.auto import tqdm

from ..images import IMAGE_DECODE_ERRORS
from .batch_files import not_sent, parse_output_line, request_line
from .cache import CaptionCache, default_cache_dir
from .captioners.base import CaptionResult
from .ledger import SubmissionLedger
from .scale import store_answer

logger = logging.getLogger(__name__)

EXPORT_KIND = "export"


@dataclass
class ExportSummary:
    """What `export_caption_requests` wrote.

    Args:
        path (`str`): the request file.
        requests (`int`): request lines written.
        captions (`int`): captions those requests fill (more than `requests` with `one_request_per_image`).
        cache_hits (`int`): captions already in the cache, not exported.
        failures (`list[str]`): requests not written (e.g. an unreadable image), with the reason.
    """

    path: str
    requests: int = 0
    captions: int = 0
    cache_hits: int = 0
    failures: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = (
            f"Wrote {self.requests} request(s) for {self.captions} caption(s) to {self.path} ({self.cache_hits} "
            "caption(s) already cached)."
        )
        if self.failures:
            text += f" {len(self.failures)} not written: " + "; ".join(self.failures[:5])
        return text


@dataclass
class ImportReport:
    """What `import_caption_results` did with each line of a result file.

    Args:
        path (`str`): the result file.
        lines (`int`): non-empty lines read.
        captions_stored (`int`): captions committed to the cache by this import.
        already_cached (`int`): captions of answered lines that the cache already held (kept as they were).
        failed (`list[tuple[int, str, str]]`): `(line number, custom_id, reason)` of lines without a usable
            answer (an engine error, an empty or refused answer, a joint reply lacking types).
        unknown (`list[tuple[int, str]]`): `(line number, custom_id)` of lines whose `custom_id` no export or batch
            of this cache holds: never stored.
        malformed (`list[tuple[int, str]]`): `(line number, reason)` of lines that are not valid result lines.
        usage (`dict[str, int]`): the token counts the engine reported, summed over the known lines.
    """

    path: str
    lines: int = 0
    captions_stored: int = 0
    already_cached: int = 0
    failed: list = field(default_factory=list)
    unknown: list = field(default_factory=list)
    malformed: list = field(default_factory=list)
    usage: dict = field(default_factory=dict)

    def __str__(self) -> str:
        text = (
            f"Imported {self.path}: {self.lines} line(s), {self.captions_stored} caption(s) stored, "
            f"{self.already_cached} already cached, {len(self.failed)} failed, {len(self.unknown)} unknown "
            f"custom_id(s), {len(self.malformed)} malformed; tokens {self.usage}."
        )
        for line, custom_id, reason in self.failed[:10]:
            text += f"\n  line {line} ({custom_id[:16]}...): failed: {reason}"
        for line, custom_id in self.unknown[:10]:
            text += (
                f"\n  line {line}: unknown custom_id {custom_id!r} (not exported from this cache; not stored. "
                "Import into the cache the requests were exported from.)"
            )
        for line, reason in self.malformed[:10]:
            text += f"\n  line {line}: malformed: {reason}"
        if self.failed:
            text += "\nExport again (only the missing captions are written) or caption them with caption_dataset."
        return text


class _RequestFileWriter:
    """A batch engine that writes the requests to a file and records them in the cache instead of sending them."""

    submits_batches = True
    retry_failed = None  # nothing to retry: the answers come back through `import_caption_results`

    def __init__(self, captioner, path: str):
        if not hasattr(captioner, "request_body"):
            raise TypeError(
                "export_caption_requests needs an OpenAICompatibleCaptioner (or OpenAIBatchCaptioner) describing the "
                f"model and generation settings the engine will use; got {type(captioner).__name__}."
            )
        self.captioner, self.path = captioner, os.path.abspath(path)
        self.requests = self.captions = 0
        self.failures: list[str] = []
        self.unanswered_reason = f"exported to {self.path}; run the engine, then import_caption_results"

    def cache_identity(self) -> dict:
        return self.captioner.cache_identity()

    def caption(self, requests):
        raise TypeError("The request exporter sends nothing; use export_caption_requests.")

    def submit_and_collect(
        self, units, load_image, ledger, show_progress=True, claim=None
    ) -> Iterator[tuple[str, CaptionResult]]:
        partial, records, failures, image_row, image = self.path + ".partial", {}, [], None, None
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(partial, "w", encoding="utf-8") as handle:
            for unit in tqdm(units, unit="req", desc="Exporting", disable=not show_progress):
                if unit.row != image_row:
                    image_row = unit.row
                    try:
                        image = load_image(unit.row)
                    except IMAGE_DECODE_ERRORS as error:  # unreadable image: reported, the rest is written
                        image = f"the image cannot be read ({type(error).__name__}: {error})"
                if isinstance(image, str):
                    failures.append((unit.custom_id, not_sent(image)))
                    self.failures.append(f"row {unit.row}: {image}")
                    continue
                line = request_line(self.captioner, unit.custom_id, image, unit.prompt, unit.response_format)
                handle.write(line + "\n")
                records[unit.custom_id] = unit.record
        # recorded before the file appears under its name: every request a user can run is known to the cache
        ledger.record(f"{EXPORT_KIND}:{uuid.uuid4().hex}", EXPORT_KIND, records, {"path": self.path})
        os.replace(partial, self.path)
        self.requests = len(records)
        self.captions = sum(len(record["entries"]) for record in records.values())
        yield from failures


def export_caption_requests(
    dataset: datasets.Dataset,
    path: str,
    captioner,
    *,
    domain: str,
    show_progress: bool = True,
    **caption_kwargs,
) -> ExportSummary:
    """Writes the requests of every caption missing from the cache as Batch API JSONL, for an offline engine.

    The rows, keys and prompts are exactly those `caption_dataset(dataset, captioner, domain=domain,
    **caption_kwargs)` would request (so the same arguments must be given to it afterwards); `custom_id` is the
    cache key, `body` what `captioner` would send. Every request is recorded in the cache, so that
    `import_caption_results` can validate and store the answers. Exporting again writes the captions still missing.

    Args:
        dataset (`datasets.Dataset`): the split to caption.
        path (`str`): the JSONL file to write (replaced if it exists).
        captioner (`OpenAICompatibleCaptioner`): the model name and generation settings the engine will use
            (`base_url` and the key are not used; `api_key_env=None` is fine).
        domain (`str`): the prompt's domain word.
        show_progress (`bool`, defaults to `True`): show a progress bar.
        **caption_kwargs: any other `caption_dataset` argument (`caption_types`, `captions_per_type`, `cache_dir`,
            `one_request_per_image`, `num_shards`/`shard_index`, ...); `max_passes` is ignored.

    Returns:
        `ExportSummary`: the file, and how many requests and captions it holds.
    """
    from . import caption as caption_module

    caption_kwargs.pop("max_passes", None)
    writer = _RequestFileWriter(captioner, path)
    caption_logger = logging.getLogger(caption_module.__name__)
    level = caption_logger.level
    caption_logger.setLevel(logging.ERROR)  # the exported captions are not missing, they await their import
    try:
        result = caption_module.caption_dataset(
            dataset, writer, domain=domain, max_passes=1, show_progress=show_progress, **caption_kwargs
        )
    finally:
        caption_logger.setLevel(level)
    summary = ExportSummary(
        writer.path, writer.requests, writer.captions, result.caption_summary.cache_hits, writer.failures
    )
    logger.info("%s", summary)
    return summary


def import_caption_results(path: str, cache_dir: str | None = None) -> ImportReport:
    """Reads a Batch API output (or error) file into the caption cache, line by line, validating each line.

    A line is stored only if its `custom_id` was exported (or submitted as a batch) from this cache: its captions
    then go under the per-type keys the export recorded, so `caption_dataset` with the export's settings finds
    them. Unknown `custom_id`s and malformed lines are reported, never stored; failed requests (engine errors,
    refused or empty answers) are reported and stay missing. Importing a file twice stores nothing new.

    Args:
        path (`str`): the result JSONL, e.g. from `vllm run-batch -o` (several files: call once per file).
        cache_dir (`str`, *optional*): the caption cache the requests were exported from (see `caption_dataset`).

    Returns:
        `ImportReport`: counts, and every failed, unknown or malformed line with its number.
    """
    report = ImportReport(os.path.abspath(path))
    parsed = []
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
            keys = [entry["key"] for record in records.values() for entry in record["entries"]]
            cached = set(cache.get_many(keys))
            for number, custom_id, result in parsed:
                record = records.get(custom_id)
                if record is None:
                    report.unknown.append((number, custom_id))
                    continue
                stored = store_answer(cache, ledger, record, result)
                for name, value in result.usage.items():
                    report.usage[name] = report.usage.get(name, 0) + value
                for entry in record["entries"]:
                    if stored.get(entry["key"]) is None:
                        continue
                    if entry["key"] in cached:
                        report.already_cached += 1
                    else:
                        report.captions_stored += 1
                        cached.add(entry["key"])
                if "" in stored:
                    report.failed.append((number, custom_id, stored[""]))
    if report.failed or report.unknown or report.malformed:
        logger.warning("%s", report)
    else:
        logger.info("%s", report)
    return report
