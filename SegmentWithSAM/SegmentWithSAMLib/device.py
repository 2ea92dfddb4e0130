"""Choosing the compute device and the precision that is safe on it."""

from __future__ import annotations

import os


def select_device(preference: str | None = None):
    """The torch device to run on: ``preference`` ("cuda", "cuda:1", "mps", "cpu") or, when None/"auto",
    CUDA if available, then Apple MPS, then CPU."""
    import torch

    from .errors import ModelError

    if preference and preference != "auto":
        try:
            device = torch.device(preference)
        except RuntimeError:
            raise ModelError(f"Unknown device {preference!r}: use auto, cpu, cuda or mps.") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelError("CUDA was asked for, but no CUDA GPU is available to PyTorch here.")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ModelError("MPS was asked for, but Apple's Metal backend is not available to PyTorch here.")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def encoder_dtype(device):
    """The autocast dtype for the image encoder on ``device``: bf16/fp16 on CUDA, None (fp32) elsewhere.

    Reduced precision is used only in the encoder; the light decoder stays in fp32 so mask edges match.
    """
    import torch

    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def configure_cpu_threads() -> int:
    """Use every core this process may run on for intra-op parallelism (PyTorch's default can be lower
    inside containers); returns the thread count."""
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    if torch.get_num_threads() != cores:
        torch.set_num_threads(cores)
    return cores


def encode_batch(device) -> int:
    """How many slices to encode at once when working ahead (propagation): batches pay off on a GPU; on a CPU
    the cores are already busy with one slice."""
    return {"cuda": 8, "mps": 4}.get(getattr(device, "type", str(device)), 1)
