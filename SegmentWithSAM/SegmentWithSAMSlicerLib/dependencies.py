"""The Python packages the module needs beyond Slicer's own, found without importing them, and installed only
when the user agrees, and only what the chosen model and device need (:func:`plan`, from the groups of
``Resources/requirements.txt``):

- LiteMedSAM on the CPU: the ``[default]`` group (openvino and small packages): its OpenVINO export ships with
  the module, so no PyTorch.
- CUDA or MPS, or any other model: then also PyTorch and torchvision through the PyTorch extension
  (``PyTorchUtils``: the build that fits the GPU driver), then the ``[torch]`` group, pip held to the installed
  torch and torchvision by a constraints file, so that it never replaces them.
- SAM 2.1 and MedSAM2: then also the ``[sam2]`` group: sam2's own requirements but PyTorch, then sam2 itself built
  from source without its dependencies (``--no-deps --no-build-isolation``, ``SAM2_BUILD_CUDA=0``): its
  ``torch>=2.5.1`` pin cannot make pip replace the PyTorch extension's build. PyTorchUtils is asked for a torch
  that fits every group's torch line; a PyTorch already installed that does not is reported, never replaced.

Call :func:`install` on the main thread.

How pip failures surface (read in Slicer's source, 5.10 and 5.12): ``slicer.util.pip_install`` runs pip through
``launchConsoleProcess`` + ``logProcessOutput``, which raises ``subprocess.CalledProcessError`` on a non-zero
exit, and the PyTorch extension's ``installTorch`` calls ``slicer.util.pip_install``. So :func:`install` turns
that error into an :class:`InstallError` the panel shows, leaving the module usable for a retry."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

TORCH = ("torch", "torchvision")  # installed by the PyTorch extension, never by pip here
WITHOUT_DEPENDENCIES = ("sam2",)  # built against the installed torch: its own pins would replace it
BUILD_ENVIRONMENT = {"SAM2_BUILD_CUDA": "0"}  # sam2's optional CUDA extension is not built (it is not needed)


class Step(NamedTuple):
    """One step of an install plan: the ``requirements`` (pip requirement lines) of a ``group`` of
    requirements.txt, installed ``how``: "pytorch" (torch and torchvision, through the PyTorch extension),
    "pip" (held to the installed torch) or "pip-no-deps" (without their dependencies)."""

    group: str
    requirements: tuple[str, ...]
    how: str


def requirements_file() -> Path:
    return Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"


def requirement_groups() -> dict[str, list[str]]:
    """The requirement lines of each ``# [group]`` of requirements.txt, in order."""
    groups: dict[str, list[str]] = {}
    lines = requirements_file().read_text(encoding="utf-8").splitlines()
    for line in lines:
        header = re.match(r"#\s*\[(\w+)\]", line)
        if header:
            groups[header.group(1)] = []
        elif line.strip() and not line.startswith("#"):
            groups[next(reversed(groups))].append(line.strip())
    return groups


def distribution(requirement: str) -> str:
    """The distribution name a requirement line names ("sam2>=1.1" → "sam2")."""
    return re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower()


def plan(model: str, device: str = "auto", torch_installed: bool = False) -> list[Step]:
    """The install steps for ``model`` (a registry name or a checkpoint path) on ``device`` ("auto", "cpu", "cuda",
    "mps"). ``torch_installed``: whether PyTorch is there already; "auto" then may choose a GPU, which runs on
    PyTorch, so the ``[torch]`` group is planned too. Pure: reads requirements.txt and the model registry only."""
    from SegmentWithSAMLib.models import ARCHITECTURES, SAM2, registry

    entry = registry().get(model)
    adapter = ARCHITECTURES[entry.architecture].adapter if entry is not None else None
    shipped = adapter is not None and adapter.shipped_export is not None
    light = shipped and (device == "cpu" or (device == "auto" and not torch_installed))
    sam2 = adapter is not None and issubclass(adapter, SAM2)
    groups = requirement_groups()
    chosen = ["default", *([] if light else ["torch"]), *(["sam2"] if sam2 else [])]
    lines = [line for group in chosen for line in groups[group]]
    steps = [Step("torch", tuple(line for line in lines if distribution(line) in TORCH), "pytorch")]
    for group in chosen:
        steps.append(Step(group, tuple(line for line in groups[group] if distribution(line) not in TORCH
                                       and distribution(line) not in WITHOUT_DEPENDENCIES), "pip"))
        steps.append(Step(group, tuple(line for line in groups[group]
                                       if distribution(line) in WITHOUT_DEPENDENCIES), "pip-no-deps"))
    return [step for step in steps if step.requirements]


def pip_arguments(step: Step, constraints: Path | None) -> list[str]:
    """``pip install``'s arguments for a pip ``step``: held to the installed torch by the ``constraints`` file
    (None: no PyTorch installed, as in the default group's plan), or without dependencies."""
    options = ["--no-deps", "--no-build-isolation"] if step.how == "pip-no-deps" else []
    return [*options, *(["-c", str(constraints)] if constraints is not None else []), *step.requirements]


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def missing(model: str, device: str = "auto") -> list[str]:
    """Distribution names that :func:`install` would install for ``model`` on ``device`` (nothing imported)."""
    steps = plan(model, device, _version("torch") is not None)
    return [distribution(line) for step in steps for line in step.requirements if _version(distribution(line)) is None]


class InstallError(RuntimeError):
    """Installing a dependency failed; the message says what failed and where the full log is."""


def _log_location() -> str:
    """Where Slicer's log of this session is (pip's full output goes there and to the Python console)."""
    import slicer

    try:
        path = slicer.app.currentLogFile()  # a public slot of qSlicerApplication (Base/QTGUI/qSlicerApplication.h)
    except AttributeError:  # no GUI application (PythonSlicer, tests)
        path = ""
    return f"the log file {path}" if path else "the Python console (View → Python Console)"


def _pip_failure(what: str, error: subprocess.CalledProcessError) -> InstallError:
    output = error.output.decode(errors="replace") if isinstance(error.output, bytes) else error.output
    output = output if isinstance(output, str) else ""  # logProcessOutput passes the process's stream
    tail = "\n".join(line for line in output.strip().splitlines()[-3:])
    return InstallError(f"Installing {what} failed (pip exit status {error.returncode})."
                        + (f"\n{tail}" if tail else "") + f"\nThe whole log is in {_log_location()}. Click the button "
                        "again to retry.")


def _install_torch(step: Step, report: Callable[[str], None]) -> None:
    """torch and torchvision through the PyTorch extension, fitting ``step``'s lines; an installed PyTorch that
    does not fit them is reported (replacing it is the PyTorch extension's, and needs a restart)."""
    from packaging.requirements import Requirement

    wanted = {name: [Requirement(line).specifier for line in step.requirements if distribution(line) == name]
              for name in TORCH}
    installed = {name: _version(name) for name in TORCH}
    if all(installed.values()):
        unfit = [f"{name} {installed[name]} (needs {specifier})" for name in TORCH for specifier in wanted[name]
                 if not specifier.contains(installed[name], prereleases=True)]
        if unfit:
            raise InstallError("This model needs a newer PyTorch than the one installed: " + ", ".join(unfit)
                               + ". Update it in the PyTorch Utils module, restart Slicer and try again.")
        return
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise InstallError("This model needs the PyTorch extension: install 'PyTorch' from the Extensions Manager "
                           "and restart Slicer.") from None
    report("Installing PyTorch (this can take several minutes)…")
    join = lambda specifiers: ",".join(str(s) for s in specifiers) or None  # noqa: E731
    try:
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=join(wanted["torch"]),
            torchvisionVersionRequirement=join(wanted["torchvision"]))
    except subprocess.CalledProcessError as error:  # installTorch runs pip through slicer.util.pip_install
        raise _pip_failure("PyTorch", error) from None
    if torch is None:
        raise InstallError(f"PyTorch was not installed; the reason is in {_log_location()}.")


def _pip_install(slicer, step: Step, report: Callable[[str], None]) -> None:
    """``step``'s packages through ``slicer.util.pip_install``, with the installed torch and torchvision as
    constraints and sam2's build settings in pip's environment."""
    names = ", ".join(distribution(line) for line in step.requirements)
    report(f"Installing {names}…")
    pins = [f"{name}=={_version(name)}" for name in TORCH if _version(name)]
    with tempfile.TemporaryDirectory() as folder:
        constraints = Path(folder) / "constraints.txt" if pins else None
        if constraints is not None:
            constraints.write_text("\n".join(pins) + "\n", encoding="utf-8")
        before = {name: os.environ.get(name) for name in BUILD_ENVIRONMENT}
        os.environ.update(BUILD_ENVIRONMENT)  # read by sam2's build in pip's process, which inherits Slicer's
        try:
            slicer.util.pip_install(pip_arguments(step, constraints))
        except subprocess.CalledProcessError as error:
            raise _pip_failure(names, error) from None
        finally:  # Slicer's own environment as it was
            for name, value in before.items():
                if value is None:
                    del os.environ[name]
                else:
                    os.environ[name] = value


def install(model: str, device: str = "auto", report: Callable[[str], None] = print) -> None:
    """Install what :func:`missing` lists for ``model`` on ``device`` (ask the user first), step by step as
    :func:`plan` orders them. Raises :class:`InstallError` with a message the user can act on (what failed,
    pip's last lines, where the log is) if the PyTorch extension is absent or unfit, or an install fails; what
    was installed stays, so calling again retries only the rest. In Slicer's testing mode nothing is installed
    (the test environment must bring the packages)."""
    import slicer

    needed = missing(model, device)
    if not needed:
        return
    if slicer.app.testingEnabled():
        raise InstallError("Slicer runs in testing mode, where nothing is installed; these packages are missing: "
                           + ", ".join(needed) + ".")
    for step in plan(model, device, _version("torch") is not None):
        if step.how != "pytorch" and not any(distribution(line) in needed for line in step.requirements):
            continue  # PyTorch's step runs always: an installed PyTorch is checked against the lines
        if step.how == "pytorch":
            _install_torch(step, report)
        else:
            _pip_install(slicer, step, report)
    still = missing(model, device)
    if still:
        raise InstallError("These packages could not be installed: " + ", ".join(still)
                           + f". pip's messages are in {_log_location()}.")
    report("All dependencies are installed.")
