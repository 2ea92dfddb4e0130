"""Speed of every engine side by side in one run: encoder ms per slice, decoder ms per box click on a cached
slice, ms per point click (the default box ensemble), propagation slices/s (encoding included; also with
``skip=2``: the model on every third slice, the two between interpolated), and the masks' Dice against eager
PyTorch fp32 (the reference); then the command line end to end and peak memory.

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
from SegmentWithSAMLib.metrics import dice
from SegmentWithSAMLib.models import load_model
from SegmentWithSAMLib.prompts import predict_prompts
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
            times[engine].append(timed_ms(lambda s=session, i=i: s.set_slice(view, index + i), 1)[0])
    return {engine: statistics.median(t[1:]) for engine, t in times.items()}  # the first one warms up


def measure(session: Session, cases, slices: int) -> tuple[dict, list[np.ndarray]]:
    """One engine's click and propagation figures and its masks for ``cases`` [(view, index, box (4,))]."""
    view, index, box = cases[0]
    session.set_slice(view, index)
    decoder = timed_ms(lambda: session.predictor.predict(box=box), 15)[3:]
    click = ((box[:2] + box[2:]) / 2)[None]  # a point click: the default box ensemble (4 boxes, see prompts)
    spacing = session.axes(view).pixel_spacing
    clicks = timed_ms(lambda: predict_prompts(session.predictor, click, [1], pixel_spacing=spacing), 8)[2:]
    masks = box_masks(session, cases)
    rate, skipping = (propagation_rate(session, view, index, masks[0], index + slices * (skip + 1), skip)
                      for skip in (0, 2))
    return {"decoder_ms": statistics.median(decoder), "point_click_ms": statistics.median(clicks),
            "propagation_slices_per_s": rate, "propagation_skip2_slices_per_s": skipping}, masks


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
    sessions, loads = {}, {}
    for engine in ["torch", *[e for e in available_engines() if e != "torch"]]:
        start = time.perf_counter()
        sessions[engine] = Session(volume, load_model("litemedsam", "cpu", engine=engine), cache=EmbeddingCache())
        loads[engine] = (time.perf_counter() - start) * 1e3
    view, index, _ = cases[0]
    encoders = encoder_ms(sessions, view, index, args.slices)
    rows, reference = [], None
    for engine, session in sessions.items():
        row, masks = measure(session, cases, args.slices)
        row.update(engine=engine, load_ms=loads[engine], encoder_ms=encoders[engine])
        reference = masks if reference is None else reference
        row["dice_vs_reference"] = float(np.mean([dice(a, b) for a, b in zip(reference, masks, strict=True)]))
        rows.append(row)
    base = rows[0]["encoder_ms"]
    for row in rows:
        row["encoder_speedup"] = base / row["encoder_ms"]
    faithful = [r for r in rows if r["dice_vs_reference"] >= 0.99]
    best = min(faithful, key=lambda r: r["encoder_ms"])
    print(f"\nLiteMedSAM engines on {platform.processor() or platform.machine()}, CPU "
          f"({__import__('torch').get_num_threads()} threads), {len(cases)} Colin27 slices:\n")
    headers = ["engine", "encoder_ms", "encoder_speedup", "decoder_ms", "point_click_ms", "propagation_slices_per_s",
               "propagation_skip2_slices_per_s", "dice_vs_reference", "load_ms"]
    print_table(headers, [[r[h] if isinstance(r[h], str) else round(r[h], 3) for h in headers] for r in rows])

    view, index, box = cases[0]
    axes = slice_axes(volume, view)
    corners = volume.to_ras(axes.pixel_to_ijk(index, box.reshape(2, 2))).ravel()
    cli = []
    for _ in range(2):
        begin = time.perf_counter()
        subprocess.run([sys.executable, "-m", "SegmentWithSAMLib.cli", "segment", str(colin27().image),
                        "--view", view, "--box=" + ",".join(map(str, corners)), "--out", "/tmp/swsam-bench.nii.gz",
                        "--json"], check=True, capture_output=True)
        cli.append((time.perf_counter() - begin) * 1e3)
    results = {
        "encoder_speedup": best["encoder_speedup"], "decoder_ms": best["decoder_ms"],
        "dice_vs_reference": best["dice_vs_reference"], "engine": best["engine"], "engines": rows,
        "cli_end_to_end_ms": statistics.median(cli),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cli_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    print(f"\nfastest faithful engine: {best['engine']} (×{best['encoder_speedup']:.2f} encoder); CLI end to end "
          f"{results['cli_end_to_end_ms']:.0f} ms; peak RSS {results['peak_rss_mb']:.0f} MB (all engines in one "
          f"process), CLI {results['cli_peak_rss_mb']:.0f} MB")
    write_json("speed", results, one_line=args.json)


if __name__ == "__main__":
    main()
