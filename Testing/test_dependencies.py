"""What the Slicer module installs for each model and device (SegmentWithSAMSlicerLib/dependencies.py): the
default model on the CPU gets openvino and small packages only; PyTorch comes from the PyTorch extension, and
nothing pip installs may replace it: every torch line fits the installed torch, every package pip installs with
its dependencies is content with it (checked by pip itself, offline), sam2 is installed without dependencies."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from SegmentWithSAMLib.models import registry
from SegmentWithSAMSlicerLib import dependencies
from SegmentWithSAMSlicerLib.dependencies import Step, distribution, pip_arguments, plan

ROOT = Path(__file__).resolve().parents[1]
MODELS = sorted(registry())
DEVICES = ("auto", "cpu", "cuda", "mps")


def installed(name: str) -> str:
    return metadata.version(name)


def test_the_default_model_on_the_cpu_needs_openvino_and_small_packages_only():
    light = [Step("default", ("openvino>=2024.0", "slicerio>=1.1", "tqdm>=4.66", "pillow>=10"), "pip")]
    assert plan("litemedsam", "cpu") == plan("litemedsam", "cpu", torch_installed=True) == light
    assert plan("litemedsam", "auto") == light  # without PyTorch, "auto" is the CPU
    for device in ("cuda", "mps"):
        steps = plan("litemedsam", device)
        assert steps[0] == Step("torch", ("torch>=2.1", "torchvision>=0.16"), "pytorch")
        assert [step.group for step in steps[1:]] == ["default", "torch"]
    assert plan("litemedsam", "auto", torch_installed=True) == plan("litemedsam", "cuda")  # auto may pick a GPU


@pytest.mark.parametrize("model", MODELS)
def test_each_model_gets_what_it_needs_and_pytorch_only_from_the_extension(model):
    sam2 = registry()[model].architecture.startswith(("sam2", "medsam2"))
    for device in DEVICES:
        steps = plan(model, device, torch_installed=True)
        names = [distribution(line) for step in steps for line in step.requirements]
        assert ("sam2" in names) == sam2 and "openvino" in names
        if model == "litemedsam" and device == "cpu":
            continue  # the light plan, above
        assert all(step.how == "pytorch" for step in steps if {"torch", "torchvision"} & set(map(distribution,
                                                                                                step.requirements)))
        assert [step.how for step in steps if step.how != "pip"] == ["pytorch", *(["pip-no-deps"] if sam2 else [])]
        if sam2:  # sam2 after everything it is built against, without its dependencies
            assert steps[-1] == Step("sam2", ("sam2>=1.1",), "pip-no-deps")
            assert {"torch>=2.5.1", "torchvision>=0.20.1"} <= set(steps[0].requirements)
    assert plan(str(ROOT / "some.pth"), "cpu")[0].how == "pytorch"  # a checkpoint by path: PyTorch builds it


@pytest.mark.parametrize("model", MODELS)
def test_the_requirement_lines_fit_the_installed_torch(model):
    """Every torch and torchvision line of every plan holds for the installed versions (so the PyTorch extension
    is never asked to replace them), and so do the torch requirements of what pip installs with dependencies."""
    for device in DEVICES:
        for step in plan(model, device, torch_installed=True):
            for line in step.requirements:
                requirement = Requirement(line)
                if step.how == "pytorch":
                    assert requirement.specifier.contains(installed(requirement.name), prereleases=True), line
                elif step.how == "pip":
                    for needed in map(Requirement, metadata.requires(requirement.name) or []):
                        if needed.name in ("torch", "torchvision") and (not needed.marker or needed.marker.evaluate()):
                            assert needed.specifier.contains(installed(needed.name), prereleases=True), (line, needed)


def test_sam2_is_never_installed_in_a_way_that_may_replace_torch(tmp_path):
    """sam2 goes in without dependencies; everything else pip installs is held to the installed torch by the
    constraints file, and pip itself (offline, dry run, in this environment) keeps torch and torchvision."""
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(f"torch=={installed('torch')}\ntorchvision=={installed('torchvision')}\n")
    steps = {step for model in MODELS for step in plan(model, "cuda") if step.how != "pytorch"}
    for step in steps:
        arguments = pip_arguments(step, constraints)
        if "sam2" in map(distribution, step.requirements):
            assert step.how == "pip-no-deps" and "--no-deps" in arguments
        else:
            assert arguments[:2] == ["-c", str(constraints)]
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", *arguments],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "Would install" not in done.stdout, done.stdout  # all there: torch is never touched
    sam2 = {str(r) for r in map(Requirement, metadata.requires("sam2")) if r.name in ("torch", "torchvision")}
    assert sam2 <= set(dependencies.requirement_groups()["sam2"])  # sam2's own pins are checked before it goes in


def test_the_groups_are_the_python_package_s_requirements():
    """The default group is the base install's (less what Slicer brings and the batch command's Dask), the torch
    group is the [torch] extra."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    groups = dependencies.requirement_groups()
    assert list(groups) == ["default", "torch", "sam2"]
    base = {line.split("#")[0].strip() for line in project["dependencies"]}
    assert set(groups["default"]) <= base
    assert {distribution(line) for line in base - set(groups["default"])} == {"numpy", "scipy", "simpleitk",
                                                                                "dask"}
    assert set(groups["torch"]) == set(project["optional-dependencies"]["torch"])


def test_nothing_is_missing_here():
    assert all(dependencies.missing(model, device) == [] for model in MODELS for device in DEVICES)
