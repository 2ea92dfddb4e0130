"""LiteMedSAM on a GPU (CUDA or MPS), side by side in one run: the image encoder at batch 1 and batched, in
fp32 and in the autocast precision the core uses there; the decoder per box click; propagation slices/s
(encoding included) with the model on every slice and with ``skip=2``; and the masks' Dice against eager fp32
PyTorch on the CPU (the reference) on one box per AAL structure and view.

    python benchmarks/gpu.py [--device cuda] [--slices 120] [--json] [--profile FILE]

``--json`` ends with one line holding every figure; ``--profile`` writes a cProfile listing of one
propagation (where the host time goes).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics

import numpy as np
import torch

from SegmentWithSAMLib.cache import EmbeddingCache
from SegmentWithSAMLib.device import encoder_dtype
from SegmentWithSAMLib.geometry import slice_axes
from SegmentWithSAMLib.loading import configure_process_threads, load_model
from SegmentWithSAMLib.metrics import dice
from SegmentWithSAMLib.predictor import normalize_slice
from SegmentWithSAMLib.preprocessing import SliceTransform
from SegmentWithSAMLib.session import Session

from common import (
    VIEWS,
    box_masks,
    load_colin27,
    print_table,
    propagation_rate,
    structure_slices,
    tight_box,
    timed_ms,
    write_json,
)


def synchronizer(device: torch.device):
    return {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(device.type, lambda: None)


def model_batch(session: Session, view: str, first: int, count: int) -> np.ndarray:
    """``count`` consecutive slices of ``view`` from ``first`` as the encoder's input (count, 3, S, S)."""
    axes = session.axes(view)
    transform = SliceTransform.for_slice(axes.image_shape, axes.pixel_spacing, session.model.input_size)
    return np.concatenate([transform.image_to_model(normalize_slice(session.windowed_slice(axes, first + i)))
                           for i in range(count)])


def encoder_rows(session: Session, view: str, first: int, batches: list[int], sync) -> list[dict]:
    """ms per slice of the encoder at several batch sizes, fp32 and the core's autocast precision."""
    model, rows = session.model, []
    for batch in batches:
        batch_array = model_batch(session, view, first, batch)  # encode() takes NumPy: its copy to the GPU counts
        images = torch.from_numpy(batch_array).to(model.device)
        fp32 = lambda im=images: model.image_encoder(model.normalize(im))  # noqa: E731
        for precision, run in (("fp32", fp32), ("autocast", lambda im=batch_array: model.encode(im))):
            with torch.inference_mode():
                times = timed_ms(run, 12, sync)[2:]
            rows.append({"encoder": precision, "batch": batch, "ms_per_slice": statistics.median(times) / batch,
                         "slices_per_s": 1e3 * batch / statistics.median(times)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or mps")
    parser.add_argument("--slices", type=int, default=120, help="slices to propagate through")
    parser.add_argument("--batches", default="1,8,32", help="encoder batch sizes to time (comma separated)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--profile", help="write a cProfile listing of one propagation here")
    args = parser.parse_args()
    volume, atlas = load_colin27()
    cases = [(view, index, tight_box(truth)) for view in VIEWS
             for _, index, truth in structure_slices(atlas, slice_axes(volume, view))]
    gpu = Session(volume, load_model("litemedsam", args.device, engine="torch"), cache=EmbeddingCache())
    device, sync = gpu.model.device, synchronizer(gpu.model.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    cpu = load_model("litemedsam", "cpu", engine="torch")
    configure_process_threads(cpu)  # this script is the process's entry point: PyTorch on every core for the CPU's
    reference = box_masks(Session(volume, cpu), cases)
    gpu_masks = box_masks(gpu, cases)
    agreement = float(np.mean([dice(a, b) for a, b in zip(reference, gpu_masks, strict=True)]))

    view, index, box = cases[0]
    axes = slice_axes(volume, view)
    first = max(0, min(index - 16, axes.num_slices - 64))
    encoders = encoder_rows(gpu, view, first, [int(b) for b in args.batches.split(",")], sync)
    gpu.set_slice(view, index)
    decoder = statistics.median(timed_ms(lambda: gpu.predictor.predict(box=box), 40, sync)[5:])
    seed = gpu_masks[0]
    slices = min(args.slices, axes.num_slices - 1 - index)
    propagation_rate(gpu, view, index, seed, index + 8, 0, sync)  # warm-up
    every = [propagation_rate(gpu, view, index, seed, index + slices, 0, sync) for _ in range(3)]
    skipping = [propagation_rate(gpu, view, index, seed, index + slices, 2, sync) for _ in range(3)]
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(propagation_rate, gpu, view, index, seed, index + slices, 0, sync)
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        with open(args.profile, "w") as file:
            file.write(text.getvalue())

    precision = str(encoder_dtype(device) or "fp32").removeprefix("torch.")
    print(f"\nLiteMedSAM on {name} ({precision} in the encoder), {len(cases)} Colin27 boxes:\n")
    print_table(["encoder", "batch", "ms_per_slice", "slices_per_s"],
                [[r["encoder"], r["batch"], round(r["ms_per_slice"], 3), round(r["slices_per_s"], 1)]
                 for r in encoders])
    results = {
        "device": name, "encoder_precision": precision, "dice_vs_reference": agreement, "decoder_ms": decoder,
        "encoder": encoders,
        "propagation_slices": slices, "propagation_slices_per_s": statistics.median(every),
        "propagation_skip2_slices_per_s": statistics.median(skipping),
    }
    print(f"\ndecoder {decoder:.2f} ms per box click; propagation through {slices} slices "
          f"{results['propagation_slices_per_s']:.0f} slices/s (skip 2: "
          f"{results['propagation_skip2_slices_per_s']:.0f}); Dice vs eager fp32 on the CPU {agreement:.4f}")
    write_json("gpu", results, one_line=args.json)


if __name__ == "__main__":
    main()
