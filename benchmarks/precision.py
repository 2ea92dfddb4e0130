"""How much precision LiteMedSAM's image encoder needs: mean and minimum Dice of the masks (box prompts on Colin27
structure slices, eager fp32 decoder) when the matrix products and convolutions of one part of the encoder take
their inputs and weights rounded to bf16 — what a bf16 kernel reads — while they accumulate, and everything else
runs, in fp32; with each part's share of the encoder's arithmetic.

    python benchmarks/precision.py [--json]

This separates the arithmetic from any runtime: OpenVINO in bf16 also stores activations, layer norms and
residual sums in bf16; here only the products' operands are rounded. A part whose masks stay within the
faithfulness bar (mean Dice ≥ 0.99 against fp32) could run on bf16 kernels; the others need fp32 arithmetic.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from SegmentWithSAMLib.geometry import slice_axes
from SegmentWithSAMLib.loading import configure_process_threads, load_model
from SegmentWithSAMLib.metrics import dice
from SegmentWithSAMLib.session import Session

from common import load_colin27, print_table, structure_slices, tight_box, write_json

PRODUCTS = {F.linear, F.conv2d, torch.matmul, torch.bmm, torch.mm, torch.addmm, torch.Tensor.__matmul__}


class RoundedProducts(TorchFunctionMode):
    """Rounds the fp32 operands of matrix products and convolutions to bf16 (biases excepted) while ``active``."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active and func in PRODUCTS:
            operands = 2 if func in (F.linear, F.conv2d) else len(args)
            args = tuple(_bf16(a) if i < operands else a for i, a in enumerate(args))
        return func(*args, **kwargs)


def _bf16(x):
    return x.to(torch.bfloat16).float() if isinstance(x, torch.Tensor) and x.dtype == torch.float32 else x


def parts(encoder) -> dict[str, list[torch.nn.Module]]:
    """TinyViT's parts one by one, then the encoder from each part to its end (the later stages are the ones
    that bear bf16 best)."""
    last = len(encoder.layers)
    named = {"patch embedding + stage 1": [encoder.patch_embed, encoder.layers[0]],
             **{f"stage {i + 1}": [encoder.layers[i]] for i in range(1, last - 1)},
             f"stage {last} + neck": [encoder.layers[-1], encoder.neck]}
    names, modules = list(named), list(named.values())
    suffixes = {f"{names[i].split(' + ')[0]} to the end" if i else "all":
                [module for group in modules[i:] for module in group] for i in range(len(names) - 2, -1, -1)}
    return {**named, **suffixes}


def switch(rounding: RoundedProducts, modules: list[torch.nn.Module]) -> list:
    """Hooks that turn ``rounding`` on inside ``modules``' forward passes; returns their handles."""
    def on(*_):
        rounding.active = True

    def off(*_):
        rounding.active = False

    return [hook for module in modules
            for hook in (module.register_forward_pre_hook(on), module.register_forward_hook(off))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args()
    volume, atlas = load_colin27()
    model = load_model(engine="torch")
    configure_process_threads(model)  # this script is the process's entry point
    cases = [(view, index, tight_box(truth)) for view in ("axial", "coronal", "sagittal")
             for _, index, truth in structure_slices(atlas, slice_axes(volume, view))]

    def masks(rounding: RoundedProducts | None = None) -> list[np.ndarray]:
        session, out = Session(volume, model), []  # a new session: embeddings computed afresh
        for view, index, box in cases:
            with torch.no_grad(), (rounding or torch.no_grad()):
                session.set_slice(view, index)
            out.append(session.predictor.predict(box=box).masks[0])
        return out

    reference = masks()
    encoder = model.image_encoder
    with FlopCounterMode(display=False) as counter:
        encoder(torch.zeros(1, 3, model.input_size, model.input_size))
    flops = counter.get_flop_counts()
    total = counter.get_total_flops()
    rows, results = [], []
    for name, modules in parts(encoder).items():
        rounding = RoundedProducts()
        handles = switch(rounding, modules)
        try:
            scores = np.array([dice(a, b) for a, b in zip(reference, masks(rounding), strict=True)])
        finally:
            for handle in handles:
                handle.remove()
        share = sum(sum(flops.get(_flop_key(encoder, module), {}).values()) for module in modules) / total
        results.append({"part": name, "gflop": share * total / 1e9, "share": share,
                        "mean_dice": float(scores.mean()), "min_dice": float(scores.min())})
        rows.append([name, share * total / 1e9, share, float(scores.mean()), float(scores.min())])
    print(f"\nLiteMedSAM encoder, products' operands in bf16 by part, {len(cases)} Colin27 boxes "
          f"(encoder {total / 1e9:.1f} GFLOP per slice):\n")
    print_table(["part in bf16", "GFLOP", "share", "mean Dice vs fp32", "min Dice"], rows)
    write_json("precision", {"cases": len(cases), "encoder_gflop": total / 1e9, "parts": results},
               one_line=args.json)


def _flop_key(root: torch.nn.Module, module: torch.nn.Module) -> str:
    """The name FlopCounterMode gives ``module`` inside ``root``."""
    name = next(n for n, m in root.named_modules() if m is module)
    return f"{type(root).__name__}.{name}"


if __name__ == "__main__":
    main()
