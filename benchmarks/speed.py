"""Speed of the core on this machine: encoder ms per slice, decoder ms per click with a cached embedding,
the command line end to end, and peak memory.

    python benchmarks/speed.py [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from SegmentWithSAMLib.data import colin27
from SegmentWithSAMLib.models import load_model
from SegmentWithSAMLib.prompts import predict_prompts
from SegmentWithSAMLib.session import Session

from common import load_colin27, print_table, structure_slices, write_json


def _ms(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--slices", type=int, default=6)
    args = parser.parse_args()
    volume, atlas = load_colin27()
    start = time.perf_counter()
    model = load_model("litemedsam")
    load_ms = (time.perf_counter() - start) * 1e3
    session = Session(volume, model)
    axes = session.axes("axial")
    name, index, truth = next(structure_slices(atlas, axes))
    encoder = []
    for offset in range(args.slices):  # distinct slices: no cache hit
        encoder += _ms(lambda o=offset: session.set_slice("axial", index - args.slices // 2 + o), 1)
    encoder = encoder[1:]  # the first includes one-off warm-up
    session.set_slice("axial", index)
    r, c = np.nonzero(truth)
    box = np.array([c.min(), r.min(), c.max(), r.max()], dtype=float)
    click = np.array([[c.mean(), r.mean()]])
    decoder_box = _ms(lambda: session.predictor.predict(box=box), 20)[2:]
    decoder_click = _ms(lambda: predict_prompts(session.predictor, click, [1], pixel_spacing=axes.pixel_spacing),
                        20)[2:]
    corners = volume.to_ras(axes.pixel_to_ijk(index, box.reshape(2, 2))).ravel()
    cli = []
    for _ in range(2):
        begin = time.perf_counter()
        subprocess.run([sys.executable, "-m", "SegmentWithSAMLib.cli", "segment", str(colin27().image),
                        "--view", "axial", "--box=" + ",".join(map(str, corners)), "--out", "/tmp/swsam-bench.nii.gz",
                        "--json"], check=True, capture_output=True)
        cli.append((time.perf_counter() - begin) * 1e3)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {model.device}, torch threads "
                   f"{__import__('torch').get_num_threads()}",
        "model_load_ms": load_ms,
        "encoder_ms_per_slice": statistics.median(encoder),
        "decoder_ms_per_click_box": statistics.median(decoder_box),
        "decoder_ms_per_click_point_ensemble": statistics.median(decoder_click),
        "cli_end_to_end_ms": statistics.median(cli),
        "peak_rss_mb": peak_mb,
        "cli_peak_rss_mb": child_peak_mb,
    }
    print_table(["measure", "value"], [[k, v if isinstance(v, str) else round(v, 1)] for k, v in results.items()])
    write_json("speed", results)
    if args.json:
        print(json.dumps(results, separators=(",", ":")))


if __name__ == "__main__":
    main()
