"""Every model side by side: encoder ms per slice, decoder ms per click (box prompt, cached slice) and peak
memory, each model in its own process (so its peak memory is its own), on one Colin27 slice.

    python benchmarks/models.py [--device cpu|cuda|mps] [--models litemedsam,sam2.1_tiny,...] [--repeat 2]

LiteMedSAM runs with its real weights (PyTorch and the automatic engine); the other architectures are built
with random weights, which take exactly the time real ones would (the weights are not available offline).
MedSAM is SAM ViT-B with another normalisation, so it times as sam_vit_b.
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

MODELS = ["litemedsam", "litemedsam+auto", "sam_vit_b", "sam_vit_l", "sam_vit_h", "sam2.1_tiny", "sam2.1_small",
          "sam2.1_base_plus", "sam2.1_large", "medsam2"]
SAM2_VARIANTS = {"sam2.1_tiny": "sam2.1_hiera_t", "sam2.1_small": "sam2.1_hiera_s",
                 "sam2.1_base_plus": "sam2.1_hiera_b+", "sam2.1_large": "sam2.1_hiera_l", "medsam2": "medsam2"}


def build(name: str, device):
    """The model ``name`` on ``device``: LiteMedSAM from its real checkpoint, the others with random weights."""
    import torch

    from SegmentWithSAMLib.loading import load_model

    torch.manual_seed(0)
    if name.startswith("litemedsam"):
        return load_model("litemedsam", device, engine="auto" if name.endswith("+auto") else "torch")
    if name in SAM2_VARIANTS:
        from SegmentWithSAMLib.models.sam2 import SAM2, build_network

        return SAM2(build_network(SAM2_VARIANTS[name]), device, SAM2_VARIANTS[name])
    from segment_anything import sam_model_registry

    from SegmentWithSAMLib.models.sam import SAM

    net = sam_model_registry[name.removeprefix("sam_")]()
    return SAM(net.image_encoder, net.prompt_encoder, net.mask_decoder, device)


def measure(name: str, device_name: str, repeat: int) -> dict:
    """One model's row (run in a child process)."""
    import torch

    from SegmentWithSAMLib.cache import EmbeddingCache
    from SegmentWithSAMLib.device import select_device
    from SegmentWithSAMLib.loading import configure_process_threads
    from SegmentWithSAMLib.session import Session

    from common import load_colin27, structure_slices, tight_box, timed_ms

    device = select_device(device_name)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    volume, atlas = load_colin27()
    start = time.perf_counter()
    model = build(name, device)
    load_s = time.perf_counter() - start
    configure_process_threads(model)  # the child is its own process: its threads for its model's engine
    session = Session(volume, model, cache=EmbeddingCache())
    axes = session.axes("axial")
    _, index, truth = next(s for s in structure_slices(atlas, axes) if s[0] == "Putamen_L")
    box = tight_box(truth)
    session.set_slice("axial", index - 1)  # warm-up (first-call costs)
    encoder = [timed_ms(lambda i=i: session.set_slice("axial", index + i), 1, sync)[0] for i in range(repeat)]
    decoder = timed_ms(lambda: session.predictor.predict(box=box), 12, sync)
    row = {"model": name, "engine": model.engine, "input_size": model.input_size, "load_s": round(load_s, 2),
           "encoder_ms": round(statistics.median(encoder), 1), "decoder_ms": round(statistics.median(decoder[4:]), 1),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    if device.type == "cuda":
        row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeat", type=int, default=2, help="encoder runs per model (after one warm-up)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: measure this model, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.device, args.repeat)))
        return 0
    from common import print_table, write_json

    rows = []
    for name in args.models.split(","):
        child = subprocess.run([sys.executable, __file__, "--one", name, "--device", args.device, "--repeat",
                                str(args.repeat)], capture_output=True, text=True)
        if child.returncode:
            print(f"{name}: failed: {child.stderr.strip().splitlines()[-1]}", file=sys.stderr)
            continue
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(f"{name}: {rows[-1]}", file=sys.stderr)
    headers = ["model", "engine", "input", "encoder ms", "decoder ms", "peak RSS MB"]
    table = [[r["model"], r["engine"], r["input_size"], r["encoder_ms"], r["decoder_ms"], r["peak_rss_mb"]]
             for r in rows]
    if any("peak_gpu_mb" in r for r in rows):
        headers.append("peak GPU MB")
        for line, r in zip(table, rows, strict=True):
            line.append(r.get("peak_gpu_mb", ""))
    print_table(headers, table)
    write_json(f"models_{args.device}", {"device": args.device, "machine": platform.processor() or platform.machine(),
                                         "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
