"""Choosing the compute device and the precision that is safe on it."""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from pathlib import Path


class DeviceName(str):
    """A device named without importing PyTorch ("cpu"), with ``torch.device``'s ``type``; PyTorch takes it
    wherever it takes a device's name."""

    @property
    def type(self) -> str:
        return self.partition(":")[0]


CPU = DeviceName("cpu")


def _may_have_gpu() -> bool:
    """Whether PyTorch is installed and could see a GPU here, judged without importing it: an NVIDIA device node
    on Linux, Apple silicon (MPS) on macOS; elsewhere only PyTorch can tell."""
    if importlib.util.find_spec("torch") is None:
        return False
    if sys.platform == "darwin":
        return platform.machine() == "arm64"
    return not sys.platform.startswith("linux") or any(Path("/dev").glob("nvidia[0-9]*"))


def select_device(preference: str | None = None):
    """The device to run on: ``preference`` ("cuda", "cuda:1", "mps", "cpu") or, when None/"auto", CUDA if
    available, then Apple MPS, then CPU. The CPU is :data:`CPU` (PyTorch is not imported for it), any other a
    ``torch.device``."""
    from .errors import ModelError

    if preference == "cpu" or (preference in (None, "auto") and not _may_have_gpu()):
        return CPU
    try:
        import torch
    except ImportError:
        raise ModelError(f"The device {preference} needs PyTorch, which is not installed: "
                         "pip install 'segmentwithsam[torch]'.") from None
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
    return CPU


def encoder_dtype(device):
    """The autocast dtype for the image encoder on ``device``: bf16/fp16 on CUDA, None (fp32) elsewhere.

    Reduced precision is used only in the encoder; the light decoder stays in fp32 so mask edges match.
    """
    import torch

    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def configure_cpu_threads(engine: str = "torch") -> int:
    """PyTorch's intra-op threads on the CPU for a model that ``engine`` runs: every core this process may run
    on for PyTorch's own (its default can be lower inside containers); one for OpenVINO's, which does the heavy
    work on threads of its own — after the small tensor work left to PyTorch, PyTorch's OpenMP workers would
    spin against them (measured: about 3 ms more per click). Returns the thread count."""
    import torch

    threads = len(cpu_cores()) if engine == "torch" else 1
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def cpu_cores() -> list[int]:
    """The CPU cores this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return list(range(os.cpu_count() or 1))


def encode_batch(device) -> int:
    """How many slices to encode at once when working ahead (propagation): batches pay off on a GPU; on a CPU
    the cores are already busy with one slice."""
    return {"cuda": 8, "mps": 4}.get(getattr(device, "type", str(device)), 1)
