"""What makes a batch resumable: a key per row from its inputs' content and options, a record per finished row
(``DIR/.records/<key>.json``, written atomically after its output), and the run's report.

A row is done when its record exists and its output still has the SHA-256 recorded; a row whose volume, seed,
reference, checkpoint, prompts, options, output or fellow rows in a multi-label output changed gets a new key
and is done again. Records are JSON, never pickles.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import asdict
from pathlib import Path

from ..checkpoints import sha256_of
from ..io import atomic_write, clear_partial_writes
from ..release import RELEASE
from .manifest import Job, Row

RECORDS = ".records"  # the folder of the records, in the run's output folder
RECORD_FORMAT = 1  # bumped when a record's meaning changes, so that older records no longer count
REPORT_COLUMNS = ("row", "name", "volume", "status", "error", "output", "label", "voxels", "volume_ml", "slices",
                  "seconds", "stopped", "dice", "resumed")


def content_digest(path: str | None, memo: dict[str, str | None]) -> str | None:
    """SHA-256 of a file, or of a folder's files (a DICOM series) by relative name and content; None when there
    is no such path (that row then fails on reading it). ``memo`` keeps each path's digest for the run."""
    if path is None:
        return None
    if path not in memo:
        target = Path(path)
        if target.is_file():
            memo[path] = sha256_of(target)
        elif target.is_dir():
            digest = hashlib.sha256()
            for item in sorted(p for p in target.rglob("*") if p.is_file()):
                digest.update(f"{item.relative_to(target)}\0{sha256_of(item)}\0".encode())
            memo[path] = digest.hexdigest()
        else:
            memo[path] = None
    return memo[path]


def _row_content(row: Row, value: int, memo: dict) -> dict:
    content = asdict(row)
    content.pop("number")  # the same object at another place in the manifest is the same work
    content.update(value=value, volume_sha256=content_digest(row.volume, memo),
                   seed_sha256=content_digest(row.seed, memo), reference_sha256=content_digest(row.reference, memo),
                   checkpoint_sha256=content_digest(row.options.checkpoint, memo))
    return content


def _sha(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def job_keys(job: Job, memo: dict) -> tuple[str, ...]:
    """The key of each row of ``job``: its inputs' content and options, and those of the rows it shares its output
    with (a multi-label output is written whole)."""
    contents = [_row_content(row, value, memo) for row, value in zip(job.rows, job.values, strict=True)]
    shared = _sha({"format": RECORD_FORMAT, "software": RELEASE, "output": job.output, "rows": contents})
    return tuple(_sha({"job": shared, "row": content}) for content in contents)


def finished(records: Path, key: str, output: str) -> dict | None:
    """The record of the row with ``key`` if it was done and its ``output`` is as then, else None."""
    try:
        record = json.loads((records / f"{key}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key or not Path(output).is_file():
        return None
    return record if sha256_of(output) == record.get("output_sha256") else None


def write_record(records: Path, key: str, result: dict, output_sha256: str) -> None:
    """Record a finished row (its report entry), after its output was written."""
    path = records / f"{key}.json"
    clear_partial_writes(path)
    payload = json.dumps({**result, "key": key, "output_sha256": output_sha256}, indent=1)
    atomic_write(path, ".json", lambda tmp: Path(tmp).write_text(payload, encoding="utf-8"))


def write_report(out_dir: Path, rows: list[dict], summary: dict) -> tuple[Path, Path]:
    """``out_dir/report.csv`` (one line per row, REPORT_COLUMNS) and ``report.json`` (summary and rows)."""
    table = io.StringIO()
    writer = csv.DictWriter(table, REPORT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if row.get(k) is None else row[k] for k in REPORT_COLUMNS} for row in rows)
    paths = out_dir / "report.csv", out_dir / "report.json"
    for path, text in zip(paths, (table.getvalue(), json.dumps({"summary": summary, "rows": rows}, indent=1)),
                          strict=True):
        clear_partial_writes(path)
        atomic_write(path, path.suffix, lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8"))
    return paths
