"""``run_batch``: a cohort's rows as Dask tasks, on a local cluster by default or on a scheduler's workers.

The local cluster listens on 127.0.0.1 only: worker processes with one task thread each, one per CPU core
(each pinned to its cores, so PyTorch's and OpenVINO's threads do not oversubscribe them) or one per GPU.
Rows already done by an earlier run (:mod:`.records`) are not submitted; when none is left, no cluster starts.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..device import cpu_cores
from ..errors import ManifestError, SegmentWithSAMError
from .manifest import Job, Options, Row, group_jobs, parse_rows
from .records import RECORDS, finished, job_keys, write_report


@dataclass
class BatchReport:
    """A run's report: one entry per row (REPORT_COLUMNS of :mod:`.records`), in manifest order, and a
    summary (counts, seconds, rows per minute, model loads, encoder runs, peak memory per worker, dashboard)."""

    rows: list[dict]
    summary: dict = field(default_factory=dict)

    @property
    def failed(self) -> list[dict]:
        return [row for row in self.rows if row["status"] != "ok"]

    @property
    def exit_status(self) -> int:
        """0 when every row succeeded, 1 when some failed."""
        return 1 if self.failed else 0


def gpu_count() -> int:
    """CUDA GPUs PyTorch sees (0 without importing torch where no NVIDIA device is present)."""
    if os.name == "posix" and not Path("/dev/nvidia0").exists():
        return 0
    import torch

    return torch.cuda.device_count()


def worker_plan(workers: int | None, threads: int | None, cores: list[int], gpus: int) -> list[list[int]]:
    """The CPU cores of each local worker: ``workers`` of them (default one per GPU, else one per core), each
    with ``threads`` cores (default the cores shared out among them)."""
    count = workers or gpus or len(cores)
    per_worker = threads or max(1, len(cores) // count)
    return [[cores[(i * per_worker + t) % len(cores)] for t in range(per_worker)] for i in range(count)]


class _Progress:
    """The terminal's progress bar: rows done and failed, elapsed time and rate, fed by the workers' events."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="row", desc="batch", leave=False,
                        disable=None if enabled else True, dynamic_ncols=True)
        self.counted: set[int] = set()
        self.failed, self.lock = 0, threading.Lock()

    def row(self, number: int, status: str) -> None:
        with self.lock:
            if number in self.counted:
                return
            self.counted.add(number)
            self.failed += status != "ok"
            self.bar.set_postfix_str(f"{len(self.counted) - self.failed} done, {self.failed} failed", refresh=False)
            self.bar.update()

    def event(self, event) -> None:
        _, message = event
        self.row(int(message["row"]), str(message["status"]))

    def close(self) -> None:
        self.bar.close()


def _connect(scheduler: str | None, workers: int | None, threads: int | None, devices: set[str]):
    """A Dask client: on the scheduler at ``scheduler``, or on a new local cluster on 127.0.0.1; the plugin for its
    workers (on a local cluster: their cores and the GPU count)."""
    import logging

    from distributed import Client, LocalCluster

    from .tasks import ModelCache

    if scheduler is None:
        gpus = gpu_count() if devices & {"auto", "cuda"} else 0
        pins = worker_plan(workers, threads, cpu_cores(), gpus)
        # CRITICAL: a closing cluster's heartbeat errors are noise; a task's failures come back in the report
        cluster = LocalCluster(n_workers=len(pins), threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address="127.0.0.1:0", silence_logs=logging.CRITICAL)
        return Client(cluster), cluster, ModelCache(pins, gpus)
    if workers is not None or threads is not None:
        raise ManifestError("--workers and --threads are for the local cluster; with --scheduler the cluster's "
                            "own workers run the rows (see `dask worker --nworkers N --nthreads 1`).")
    try:
        return Client(scheduler, timeout="20s"), None, ModelCache()
    except (OSError, TimeoutError, ValueError) as exc:
        raise ManifestError(f"--scheduler {scheduler}: no Dask scheduler answers there ({exc}).") from None


def _run_on_dask(todo: list[Job], keys: dict[str, tuple[str, ...]], records: Path, progress: _Progress,
                 scheduler: str | None, workers: int | None, threads: int | None, log: Callable[[str], None],
                 summary: dict) -> dict[int, dict]:
    """Submit ``todo`` as tasks (:func:`volume_tasks`); the report entry of each of their rows by row number."""
    from distributed import as_completed

    from .tasks import PLUGIN, TOPIC, failure, run_volume

    started = time.perf_counter()
    client, cluster, plugin = _connect(scheduler, workers, threads, {r.options.device for j in todo for r in j.rows})
    results: dict[int, dict] = {}
    try:
        client.register_plugin(plugin, name=PLUGIN)
        summary["startup_seconds"] = round(time.perf_counter() - started, 2)  # cluster up, plugin on its workers
        info = client.scheduler_info()
        # the dashboard's pages need bokeh; without it only its health and metrics routes answer
        has_dashboard = "dashboard" in info.get("services", {}) and importlib.util.find_spec("bokeh") is not None
        dashboard = client.dashboard_link if has_dashboard else None
        if dashboard:
            log(f"Dask dashboard: {dashboard}")
        client.subscribe_topic(TOPIC, progress.event)
        summary.update(scheduler=client.scheduler.address, dashboard=dashboard, workers=len(info["workers"]))
        tasks = volume_tasks(todo, keys, records, len(info["workers"]))
        futures = {client.submit(run_volume, task, key=f"segment-{Path(task.volume).name}-{uuid.uuid4().hex[:8]}",
                                 pure=False): task for task in tasks}
        peaks: dict[str, float] = {}
        for future in as_completed(futures):
            task = futures[future]
            try:
                outcome = future.result()
            except Exception as exc:  # the task itself failed (its workers died again and again, ...)
                message = f"the task of {task.volume} failed: {type(exc).__name__}: {exc}"
                outcome = {"rows": [failure(row, message) for job in task.jobs for row in job.rows]}
            for row in outcome["rows"]:
                results[row["row"]] = row
                progress.row(row["row"], row["status"])
            for counter in ("model_loads", "encoder_runs"):
                summary[counter] = summary.get(counter, 0) + outcome.get(counter, 0)
            if "worker" in outcome:
                peaks[outcome["worker"]] = max(peaks.get(outcome["worker"], 0.0), outcome["peak_rss_mb"])
        summary.update(tasks=len(tasks), peak_rss_mb=peaks)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return results


def volume_tasks(todo: list[Job], keys: dict[str, tuple[str, ...]], records: Path, workers: int) -> list:
    """One task per volume, with its jobs; with fewer volumes than ``workers``, each volume's jobs are shared
    out in consecutive runs among up to workers / volumes tasks (each reading the volume once)."""
    from .tasks import VolumeTask

    by_volume: dict[str, list[Job]] = {}
    for job in todo:
        by_volume.setdefault(job.volume, []).append(job)
    parts = max(1, -(-workers // len(by_volume)))  # ceil
    tasks = []
    for volume, jobs in by_volume.items():
        for chunk in np.array_split(np.arange(len(jobs)), min(parts, len(jobs))):
            chosen = tuple(jobs[i] for i in chunk)
            tasks.append(VolumeTask(volume, chosen, tuple(keys[j.output] for j in chosen), str(records)))
    return tasks


def run_batch(rows: Iterable[Mapping[str, Any]] | list[Row], out_dir: str | os.PathLike, *,
              base: str | os.PathLike | None = None, defaults: Options | None = None, group: bool = False,
              scheduler: str | None = None, workers: int | None = None, threads: int | None = None,
              progress: bool = False, log: Callable[[str], None] = lambda text: None,
              source: str = "manifest") -> BatchReport:
    """Segment every row (manifest rows as dicts, see :mod:`.manifest`, or parsed :class:`Row` s) into
    ``out_dir`` and write ``out_dir/report.csv`` and ``report.json``; the report.

    Relative input paths are relative to ``base`` (default: the working folder), relative outputs to
    ``out_dir``. ``scheduler``: a Dask scheduler's address (``tcp://HOST:PORT``); without it a local cluster of
    ``workers`` processes (default one per core, or one per GPU) with ``threads`` cores each. Raises
    :class:`~..errors.ManifestError` for a malformed row.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if workers is not None and workers < 1 or threads is not None and threads < 1:
        raise ManifestError("--workers and --threads need a whole number of at least 1.")
    rows = list(rows)
    if rows and all(isinstance(r, Row) for r in rows):
        parsed = rows
    else:
        parsed = parse_rows(rows, base or Path.cwd(), out_dir, defaults, group, source)
    jobs = group_jobs(parsed, source)
    records = out_dir / RECORDS
    for job in jobs:
        _check_output(job, source)
    records.mkdir(parents=True, exist_ok=True)
    memo: dict[str, str | None] = {}
    keys = {job.output: job_keys(job, memo) for job in jobs}
    results: dict[int, dict] = {}
    todo = []
    for job in jobs:
        done = [finished(records, key, job.output) for key in keys[job.output]]
        if all(done):
            results.update((row.number, {**record, "row": row.number, "resumed": True})
                           for record, row in zip(done, job.rows, strict=True))
        else:
            todo.append(job)
    summary: dict = {"rows": len(parsed), "tasks": 0, "model_loads": 0, "encoder_runs": 0}
    bar = _Progress(len(parsed), len(results), progress)
    try:
        if todo:
            results.update(_run_on_dask(todo, keys, records, bar, scheduler, workers, threads, log, summary))
    finally:
        bar.close()
    report_rows = [{k: v for k, v in results[row.number].items() if k not in ("key", "output_sha256")}
                   for row in parsed]
    seconds = time.perf_counter() - started
    report = BatchReport(report_rows, summary)
    resumed = sum(bool(r.get("resumed")) for r in report_rows)
    summary.update(ok=len(report_rows) - len(report.failed), failed=len(report.failed), resumed=resumed,
                   seconds=round(seconds, 2), rows_per_minute=round(60 * (len(report_rows) - resumed) / seconds, 2))
    summary["report"] = [str(p) for p in write_report(out_dir, report_rows, summary)]
    return report


def _check_output(job: Job, source: str) -> None:
    """Create the output's folder; :class:`ManifestError` (row, field output) when it cannot be written."""
    from ..io import check_writable

    try:
        Path(job.output).parent.mkdir(parents=True, exist_ok=True)
        check_writable(job.output, labelmap=True)
    except (OSError, SegmentWithSAMError) as exc:
        raise ManifestError(f"{source}: row {job.rows[0].number}, field output: {exc}") from None
