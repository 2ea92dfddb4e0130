"""The batch against a plain loop over ``segmentwithsam segment`` for the same rows, on this machine: rows per
minute end to end (cluster start and model loads included) for 1 and 2 single-threaded workers, the gain of
loading the model once per worker, Dask's overhead per task, peak memory per worker, and a resumed run with
everything done. The batch's outputs are checked equal to the loop's, voxel for voxel.

The cohort: ``--volumes`` copies of Colin27 (NIfTI, NRRD, MHA in turn), each with two rows of AAL structures
in different views (so no row reuses another's slice encodings), a tight box on the structure's middle slice
and a range of ``--slices`` slices around it.

    python benchmarks/batch.py [--volumes 4] [--slices 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from SegmentWithSAMLib.batch import run_batch
from SegmentWithSAMLib.batch.manifest import volume_stem
from SegmentWithSAMLib.batch.run import cpu_cores
from SegmentWithSAMLib.data import AAL_STRUCTURES
from SegmentWithSAMLib.geometry import slice_axes
from SegmentWithSAMLib.io import read_volume, write_volume

from common import load_colin27, print_table, tight_box, write_json

PAIRS = (("Hippocampus_L", "axial"), ("Putamen_R", "coronal"), ("Thalamus_L", "sagittal"), ("Caudate_R", "axial"),
         ("Amygdala_R", "coronal"), ("Pallidum_L", "sagittal"))
FORMATS = (".nii.gz", ".nrrd", ".mha")


def cohort(folder: Path, volumes: int, slices: int) -> list[dict]:
    """Write ``volumes`` copies of Colin27 into ``folder``; two manifest rows for each."""
    colin, atlas = load_colin27()
    rows = []
    for v in range(volumes):
        path = folder / f"colin{v}{FORMATS[v % len(FORMATS)]}"
        write_volume(colin, path)
        for structure, view in (PAIRS[(2 * v) % len(PAIRS)], PAIRS[(2 * v + 1) % len(PAIRS)]):
            axes = slice_axes(colin, view)
            oriented = axes.oriented(atlas.array == AAL_STRUCTURES[structure])
            present = np.flatnonzero(oriented.any(axis=(1, 2)))
            index = int(present[len(present) // 2])
            corners = colin.to_ras(axes.pixel_to_ijk(index, tight_box(oriented[index]).reshape(2, 2)))
            low = index - (slices - 1) // 2
            rows.append({"volume": str(path), "name": structure, "view": view,
                         "box": ",".join(f"{c:.3f}" for c in corners.ravel()), "range": f"{low}:{low + slices - 1}"})
    return rows


def plain_loop(rows: list[dict], out: Path) -> float:
    """Seconds for one ``segmentwithsam segment`` process per row (each loads the model and uses every core)."""
    out.mkdir()
    started = time.perf_counter()
    for row in rows:
        subprocess.run([sys.executable, "-m", "SegmentWithSAMLib.cli", "segment", row["volume"], "--view", row["view"],
                        f"--box={row['box']}", "--propagate", "both", "--range", row["range"], "--out",
                        str(out / _output_name(row)), "--json"], check=True, capture_output=True)
    return time.perf_counter() - started


def _output_name(row: dict) -> str:
    return f"{volume_stem(row['volume'])}_{row['name']}.nii.gz"  # the batch's default output name


def scheduler_overhead_ms(tasks: int = 100) -> dict:
    """Milliseconds per trivial task on a local cluster of 2 single-threaded workers: one at a time (submit →
    result round trip) and many at once (submitted together)."""
    import logging

    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0",
                      silence_logs=logging.CRITICAL) as cluster, Client(cluster) as client:
        client.submit(abs, -1, pure=False).result()  # warm
        round_trips = []
        for i in range(tasks):
            began = time.perf_counter()
            client.submit(abs, -i, pure=False).result()
            round_trips.append((time.perf_counter() - began) * 1e3)
        began = time.perf_counter()
        client.gather(client.map(abs, [-i for i in range(tasks)], pure=False))
        together = (time.perf_counter() - began) * 1e3 / tasks
    return {"one_at_a_time_ms": round(statistics.median(round_trips), 2), "many_at_once_ms": round(together, 2)}


def same_outputs(rows: list[dict], loop: Path, batch: Path) -> bool:
    return all(np.array_equal(read_volume(loop / _output_name(r)).array, read_volume(batch / _output_name(r)).array)
               for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", type=int, default=4, help="Colin27 copies, two rows each (default 4)")
    parser.add_argument("--slices", type=int, default=3, help="slices per row's range (default 3)")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]  # this machine is shared: the figures mean little when it is busy
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = cohort(folder, args.volumes, args.slices)
        results, table = {}, []
        loop_s = plain_loop(rows, folder / "loop")
        results["plain_loop"] = {"seconds": round(loop_s, 1), "rows_per_minute": round(60 * len(rows) / loop_s, 2)}
        for workers in (1, 2):
            report = run_batch(rows, folder / f"batch{workers}", workers=workers, threads=1)
            assert report.exit_status == 0, report.failed
            results[f"batch_{workers}"] = {**report.summary, "identical_to_loop": same_outputs(
                rows, folder / "loop", folder / f"batch{workers}")}
        resumed = run_batch(rows, folder / "batch2", workers=2, threads=1)
        results["resumed"] = {"seconds": resumed.summary["seconds"], "tasks": resumed.summary["tasks"]}
        results["scheduler_overhead"] = scheduler_overhead_ms()
    loop_rate = results["plain_loop"]["rows_per_minute"]
    table.append(["plain loop: `segmentwithsam segment` per row (every core)", len(rows), f"{loop_s:.1f}",
                  f"{loop_rate:.1f}", "×1.00", len(rows), "", ""])
    for workers in (1, 2):
        s = results[f"batch_{workers}"]
        table.append([f"batch, {workers} worker{'s' * (workers > 1)} × 1 thread", len(rows), f"{s['seconds']:.1f}",
                      f"{s['rows_per_minute']:.1f}", f"×{s['rows_per_minute'] / loop_rate:.2f}", s["model_loads"],
                      f"{s['startup_seconds']:.1f}", " / ".join(f"{m:.0f}" for m in s["peak_rss_mb"].values())])
    print_table(["run", "rows", "seconds", "rows/min", "vs loop", "model loads", "cluster start s",
                 "peak MB per worker"], table)
    two_over_one = results["batch_2"]["rows_per_minute"] / results["batch_1"]["rows_per_minute"]
    overhead = results["scheduler_overhead"]
    print(f"\n2 workers / 1 worker: ×{two_over_one:.2f} (target ≥ 1.6); 2 workers / plain loop: "
          f"×{results['batch_2']['rows_per_minute'] / loop_rate:.2f} (target ≥ 2)")
    print(f"Dask's overhead per task: {overhead['one_at_a_time_ms']} ms one at a time (submit → result), "
          f"{overhead['many_at_once_ms']} ms each when submitted together (target < 50 ms)")
    print(f"resumed run with every row done: {results['resumed']['seconds']:.2f} s, "
          f"{results['resumed']['tasks']} tasks; outputs identical to the loop's: "
          f"{results['batch_1']['identical_to_loop'] and results['batch_2']['identical_to_loop']}")
    load = (round(load_before, 2), round(os.getloadavg()[0], 2))
    print(f"load average (1 min) before and after: {load[0]} / {load[1]} on {len(cpu_cores())} cores")
    results.update(rows=len(rows), slices_per_row=args.slices, cores=len(cpu_cores()), load_average=load,
                   two_workers_over_one=round(two_over_one, 2))
    write_json("batch", results, args.json)


if __name__ == "__main__":
    main()
