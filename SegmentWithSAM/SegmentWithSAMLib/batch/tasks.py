"""The batch's work on a Dask worker: one task per volume (read once), its rows segmented with the worker's
models (:class:`ModelCache`, loaded once per worker process), each output and record written atomically.

A task carries paths, prompts and options, never arrays. A row that fails (unreadable file, bad prompt, model
error) is reported with its message and the others go on; a task whose worker dies is run again by Dask, and
rows an earlier attempt finished are taken from their records.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from distributed import get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from ..cache import EmbeddingCache
from ..errors import SegmentWithSAMError
from .manifest import Job, Options, Row
from .records import finished, write_record

PLUGIN = "segmentwithsam-models"
TOPIC = "segmentwithsam-row"  # a worker's event per row done, for the client's progress bar


@dataclass(frozen=True)
class VolumeTask:
    """The jobs (outputs) of one volume still to do, with their rows' keys and the records folder."""

    volume: str
    jobs: tuple[Job, ...]
    keys: tuple[tuple[str, ...], ...]  # per job, per row
    records: str


def pin_threads(cores: list[int]) -> None:
    """Run every thread of this process, and the threads it starts later, on ``cores`` only: PyTorch and
    OpenVINO then size their thread pools to them (Linux; elsewhere nothing happens)."""
    if not hasattr(os, "sched_setaffinity"):
        return
    for thread in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(thread), cores)
        except OSError:  # the thread ended meanwhile
            pass


class ModelCache(WorkerPlugin):
    """The models of one worker process, each loaded on first use and kept (a failed load is remembered and
    its error raised again). ``cores`` (local cluster): the CPU cores of worker 0, 1, …; ``gpus``: how many
    GPUs the local cluster has, worker i then running rows of device ``auto`` on ``cuda:i``."""

    idempotent = True  # registering again (a second run on the same cluster) keeps the loaded models

    def __init__(self, cores: list[list[int]] | None = None, gpus: int = 0) -> None:
        self.cores, self.gpus = cores, gpus

    def setup(self, worker) -> None:
        self.models: dict[tuple, object] = {}
        self.failures: dict[tuple, SegmentWithSAMError] = {}
        self.loads = 0
        self.lock = threading.Lock()  # the models are not re-entrant: one task at a time uses them
        index = worker.name if isinstance(worker.name, int) else None
        if self.cores and index is not None:
            pin_threads(self.cores[index % len(self.cores)])
        self.gpu = index % self.gpus if self.gpus and index is not None else None

    def model(self, options: Options):
        """The model for a row's options, loaded on first use."""
        from ..loading import configure_process_threads, load_model

        device = f"cuda:{self.gpu}" if self.gpu is not None and options.device == "auto" else options.device
        key = (options.model, options.checkpoint, device, options.engine)
        if key in self.failures:
            raise self.failures[key]
        if key not in self.models:
            try:
                self.models[key] = load_model(options.model, device, options.engine, options.checkpoint)
                configure_process_threads(self.models[key])  # a worker process: its threads are its own
            except SegmentWithSAMError as exc:
                self.failures[key] = exc
                raise
            self.loads += 1
        return self.models[key]

    def client(self, options: Options):
        """This worker's client of the server the row's options name (one session per worker and server)."""
        from ..backend.client import BackendClient

        key = (options.backend, options.cafile)
        if key not in self.models:
            self.models[key] = BackendClient(server=options.backend, cafile=options.cafile)
        return self.models[key]

    def encoder_runs(self) -> int:
        return sum(getattr(model, "encoder_runs", 0) for model in self.models.values())


class TaskVolume:
    """A task's volume, read on first need (once), and its sessions: one per model and window, sharing one
    embedding cache, so rows on the same slices encode them once."""

    def __init__(self, path: str) -> None:
        self.path, self._volume, self._sessions, self._cache = path, None, {}, EmbeddingCache()

    @property
    def volume(self):
        if self._volume is None:
            from ..io import read_volume

            self._volume = read_volume(self.path)
        return self._volume

    def session(self, model, window: str | None):
        from ..session import Session

        key = (id(model), window)
        if key not in self._sessions:
            self._sessions[key] = Session(self.volume, model, window=window, cache=self._cache)
        return self._sessions[key]


def segment_row(work: TaskVolume, row: Row, models: ModelCache) -> tuple[np.ndarray, dict]:
    """Row ``row``'s 3D mask (bool, KJI) on ``work``'s volume and its report entries, exactly as
    ``segmentwithsam segment … --propagate`` (or ``propagate --mask``) gives them: the same engine steps."""
    from ..actions import Prompt, Propagate, UserEdit, prompt_from_ras, stroke_from_ras
    from ..api import Segmenter
    from ..geometry import seed_slice, slice_axes, slices_with
    from ..io import read_kept_voxels, read_labelmap_on
    from ..metrics import dice
    from ..propagation import StopRules

    options, volume = row.options, work.volume
    propagating = options.direction != "none"
    axes = slice_axes(volume, row.view)
    scribbles = [stroke_from_ras(volume, axes, points, positive) for points, positive in row.scribbles]
    if row.lasso is not None:  # every prompt is checked before any model is loaded for it
        first = stroke_from_ras(volume, axes, row.lasso, closed=True)
    elif row.seed is None and (row.box is not None or row.points):
        points = np.reshape([*row.points, *row.negatives], (-1, 3))
        labels = [1] * len(row.points) + [0] * len(row.negatives)
        first = prompt_from_ras(volume, axes, points, labels, None if row.box is None else np.reshape(row.box, (2, 3)),
                                row.slice_range if propagating else None)
    elif row.seed is None:  # a positive scribble starts the object
        first, scribbles = scribbles[0], scribbles[1:]
    else:
        seed = read_labelmap_on(row.seed, volume, row.volume).array
        index, mask2d = seed_slice(axes, seed, row.label, row.seed)
        first = UserEdit({index: mask2d})
    kept = None if options.keep is None else read_kept_voxels(options.keep, volume, row.volume)
    if options.backend is not None:
        segmenter = Segmenter(volume, view=row.view, window=options.window, backend=models.client(options))
    else:
        model = models.model(options)
        segmenter = Segmenter(volume, model, row.view, session=work.session(model, options.window))
    if kept is not None:
        segmenter.keep_out(row.name, kept)
    segmenter.step(row.name, first)
    update = None
    if propagating:
        rules = StopRules.from_options(options.min_similarity, options.min_score, options.max_area_ratio,
                                       options.min_overlap, options.max_empty)
        start = first.index if row.seed is None else index
        own_range = row.seed is not None or not isinstance(first, Prompt)  # a prompt holds its range already
        update = segmenter.step(row.name, Propagate(start, options.direction, row.slice_range if own_range else None,
                                                    rules, options.skip))
    for scribble in scribbles:
        segmenter.step(row.name, scribble)
    mask = segmenter.mask(row.name)
    voxels = int(mask.sum())
    stopped = update.stopped if update is not None else {}
    entry = {"voxels": voxels, "volume_ml": round(voxels * abs(np.linalg.det(volume.ijk_to_ras[:3, :3])) / 1e3, 4),
             "slices": len(slices_with(segmenter.axes, mask)),
             "stopped": "; ".join(f"{k}: {v}" for k, v in stopped.items())}
    if row.reference is not None:
        reference = read_labelmap_on(row.reference, volume, row.volume).array
        truth = reference != 0 if row.reference_label is None else reference == row.reference_label
        entry["dice"] = round(dice(mask, truth), 4)
    return mask, entry


def failure(row: Row, error: BaseException | str) -> dict:
    """The report entry of a row that failed."""
    if isinstance(error, BaseException):
        error = str(error) if isinstance(error, SegmentWithSAMError) else f"{type(error).__name__}: {error}"
    return {"row": row.number, "name": row.name, "volume": row.volume, "status": "failed", "error": error,
            "output": "", "resumed": False}


def _write(job: Job, volume, masks: dict[int, np.ndarray]) -> str:
    """Write the rows' masks (row position in ``job`` → mask) as ``job``'s labelmap; its SHA-256."""
    from ..checkpoints import sha256_of
    from ..io import clear_partial_writes, write_labels

    labels = np.zeros(volume.array.shape, np.uint8 if max(job.values) < 256 else np.uint16)
    for position, mask in masks.items():
        labels[mask & (labels == 0)] = job.values[position]  # where objects overlap, the earlier row keeps it
    clear_partial_writes(job.output)
    write_labels(labels, volume, job.output, {job.values[p]: job.rows[p].name for p in masks})
    return sha256_of(job.output)


def _run_job(job: Job, keys: tuple[str, ...], records: Path, work: TaskVolume, models: ModelCache,
             announce) -> list[dict]:
    done = [finished(records, key, job.output) for key in keys]
    if all(done):  # an earlier attempt of this task finished it before its worker died
        return [{**record, "resumed": True} for record in done]
    results, masks = {}, {}
    for position, row in enumerate(job.rows):
        start = time.perf_counter()
        try:
            masks[position], entry = segment_row(work, row, models)
        except Exception as exc:  # one bad row fails alone, with its message
            results[position] = failure(row, exc)
            announce(results[position])
            continue
        results[position] = {"row": row.number, "name": row.name, "volume": row.volume, "status": "ok", "error": "",
                             "output": job.output, "label": job.values[position], **entry,
                             "seconds": round(time.perf_counter() - start, 2), "resumed": False}
    if masks:
        try:
            digest = _write(job, work.volume, masks)
        except SegmentWithSAMError as exc:
            results.update({p: failure(job.rows[p], exc) for p in masks})
        else:
            for position in masks:
                write_record(records, keys[position], results[position], digest)
        for position in masks:
            announce(results[position])
    return [results[p] for p in range(len(job.rows))]


def run_volume(task: VolumeTask) -> dict:
    """Do ``task`` on this worker: its rows' report entries, this task's model loads and encoder runs, the
    worker's name and peak memory (MB)."""
    worker = get_worker()
    models: ModelCache = worker.plugins[PLUGIN]
    work = TaskVolume(task.volume)

    def announce(result: dict) -> None:
        worker.log_event(TOPIC, {"row": result["row"], "status": result["status"]})

    rows: list[dict] = []
    with models.lock:
        loads, encodes = models.loads, models.encoder_runs()
        for job, keys in zip(task.jobs, task.keys, strict=True):
            rows += _run_job(job, keys, Path(task.records), work, models, announce)
        stats = {"model_loads": models.loads - loads, "encoder_runs": models.encoder_runs() - encodes}
    return {"rows": rows, "worker": str(worker.name), "peak_rss_mb": round(peak_memory_mb(), 1), **stats}


def peak_memory_mb() -> float:
    """This process's peak resident memory in MB."""
    try:
        import resource
    except ImportError:  # Windows
        import psutil

        return psutil.Process().memory_info().peak_wset / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kilobytes on Linux
