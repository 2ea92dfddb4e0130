"""Speed of every engine side by side in one run: encoder ms per slice, decoder ms per box click on a cached
slice, ms per point click (the boxes a first click decodes, ``prompts.click_logits``), propagation slices/s
(encoding included; also with ``skip=2``: the model on every third slice, the two between interpolated), and the
masks' Dice against eager PyTorch fp32 (the reference); the clicks and the encoder are timed engines in turns, so
that the machine's drifts fall on every engine alike, each with PyTorch's threads set as a process of its own sets
them for it (``loading.configure_process_threads``); also the command line end to end and peak memory.

    python benchmarks/speed.py [--json] [--slices 4]

``--json`` ends with one line: ``encoder_speedup`` and ``decoder_ms`` of the fastest faithful engine (mean Dice
against the reference ≥ 0.99, the one ``--engine auto`` picks), ``dice_vs_reference``, and every engine's row.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from SegmentWithSAMLib.cache import EmbeddingCache
from SegmentWithSAMLib.data import colin27
from SegmentWithSAMLib.engines import available_engines
from SegmentWithSAMLib.geometry import slice_axes
from SegmentWithSAMLib.loading import configure_process_threads, load_model
from SegmentWithSAMLib.metrics import dice
from SegmentWithSAMLib.prompts import click_logits
from SegmentWithSAMLib.session import Session

from common import (
    box_masks,
    load_colin27,
    print_table,
    propagation_rate,
    structure_slices,
    tight_box,
    timed_ms,
    write_json,
)


def encoder_ms(sessions: dict[str, Session], view: str, index: int, slices: int) -> dict[str, float]:
    """Median ms per slice for each engine, encoding new slices in turns (engine by engine, slice by slice), so
    that the machine's drifts fall on every engine alike."""
    times = {engine: [] for engine in sessions}
    for i in range(-1, slices):
        for engine, session in sessions.items():
            configure_process_threads(session.model)
            times[engine].append(timed_ms(lambda s=session, i=i: s.set_slice(view, index + i), 1)[0])
    return {engine: statistics.median(t[1:]) for engine, t in times.items()}  # the first one warms up


def click_ms(sessions: dict[str, Session], case, rounds: int = 15) -> dict[str, dict[str, float]]:
    """Median ms per box click on a cached slice and per point click (the boxes around it, see
    prompts.click_logits) for each engine, engines in turns, round by round. Each engine's turn starts with a
    click not timed: PyTorch's OpenMP workers spin for a few ms after the previous engine's work, as they never
    do in a process that runs one engine."""
    view, index, box = case
    point = ((box[:2] + box[2:]) / 2)[None]
    spacing = next(iter(sessions.values())).axes(view).pixel_spacing
    times = {engine: {"decoder_ms": [], "point_click_ms": []} for engine in sessions}
    for session in sessions.values():
        session.set_slice(view, index)
    for _ in range(rounds):
        for engine, session in sessions.items():
            configure_process_threads(session.model)
            session.predictor.predict(box=box)
            times[engine]["decoder_ms"] += timed_ms(lambda s=session: s.predictor.predict(box=box), 1)
            times[engine]["point_click_ms"] += timed_ms(
                lambda s=session: click_logits(s.predictor, point, spacing), 1)
    return {engine: {key: statistics.median(t[2:]) for key, t in figures.items()}  # the first ones warm up
            for engine, figures in times.items()}


def measure(session: Session, cases, slices: int) -> tuple[dict, list[np.ndarray]]:
    """One engine's propagation figures and its masks for ``cases`` [(view, index, box (4,))]."""
    view, index, _ = cases[0]
    masks = box_masks(session, cases)
    rate, skipping = (propagation_rate(session, view, index, masks[0], index + slices * (skip + 1), skip)
                      for skip in (0, 2))
    return {"propagation_slices_per_s": rate, "propagation_skip2_slices_per_s": skipping}, masks


def cli_ms(volume, case, runs: int = 2) -> list[float]:
    """``segmentwithsam segment`` end to end (start, load, encode, one box, write) in a child process, after
    one run not counted (it exports the engine if this machine has not yet)."""
    view, index, box = case
    axes = slice_axes(volume, view)
    corners = volume.to_ras(axes.pixel_to_ijk(index, box.reshape(2, 2))).ravel()
    command = [sys.executable, "-m", "SegmentWithSAMLib.cli", "segment", str(colin27().image), "--view", view,
               "--box=" + ",".join(map(str, corners)), "--out", "/tmp/swsam-bench.nii.gz", "--json"]
    times = []
    for _ in range(runs + 1):
        begin = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append((time.perf_counter() - begin) * 1e3)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--slices", type=int, default=4, help="slices to encode/propagate per engine")
    args = parser.parse_args()
    volume, atlas = load_colin27()
    cases = []
    for view in ("axial", "coronal", "sagittal"):
        axes = slice_axes(volume, view)
        for _, index, truth in list(structure_slices(atlas, axes))[:2]:
            cases.append((view, index, tight_box(truth)))
    # The command line first: a child's peak memory counts what it inherited from this process at fork.
    cli = cli_ms(volume, cases[0])
    cli_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    sessions, loads = {}, {}
    for engine in ["torch", *[e for e in available_engines() if e != "torch"]]:
        start = time.perf_counter()
        sessions[engine] = Session(volume, load_model("litemedsam", "cpu", engine=engine), cache=EmbeddingCache())
        loads[engine] = (time.perf_counter() - start) * 1e3
    view, index, _ = cases[0]
    encoders = encoder_ms(sessions, view, index, args.slices)
    clicks = click_ms(sessions, cases[0])
    rows, reference = [], None
    for engine, session in sessions.items():
        configure_process_threads(session.model)
        row, masks = measure(session, cases, args.slices)
        row.update(engine=engine, load_ms=loads[engine], encoder_ms=encoders[engine], **clicks[engine])
        reference = masks if reference is None else reference
        row["dice_vs_reference"] = float(np.mean([dice(a, b) for a, b in zip(reference, masks, strict=True)]))
        rows.append(row)
    base = rows[0]["encoder_ms"]
    for row in rows:
        row["encoder_speedup"] = base / row["encoder_ms"]
    faithful = [r for r in rows if r["dice_vs_reference"] >= 0.99]
    best = min(faithful, key=lambda r: r["encoder_ms"])
    cores = configure_process_threads()
    print(f"\nLiteMedSAM engines on {platform.processor() or platform.machine()}, CPU ({cores} cores), "
          f"{len(cases)} Colin27 slices:\n")
    headers = ["engine", "encoder_ms", "encoder_speedup", "decoder_ms", "point_click_ms", "propagation_slices_per_s",
               "propagation_skip2_slices_per_s", "dice_vs_reference", "load_ms"]
    print_table(headers, [[r[h] if isinstance(r[h], str) else round(r[h], 3) for h in headers] for r in rows])

    results = {
        "encoder_speedup": best["encoder_speedup"], "decoder_ms": best["decoder_ms"],
        "dice_vs_reference": best["dice_vs_reference"], "engine": best["engine"], "engines": rows,
        "cli_end_to_end_ms": statistics.median(cli),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cli_peak_rss_mb": cli_rss,
    }
    print(f"\nfastest faithful engine: {best['engine']} (×{best['encoder_speedup']:.2f} encoder); CLI end to end "
          f"{results['cli_end_to_end_ms']:.0f} ms; peak RSS {results['peak_rss_mb']:.0f} MB (all engines in one "
          f"process), CLI {results['cli_peak_rss_mb']:.0f} MB")
    write_json("speed", results, one_line=args.json)


if __name__ == "__main__":
    main()
