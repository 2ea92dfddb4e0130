"""The fast CPU engine (OpenVINO) against the PyTorch reference: faithful masks, export cached per checkpoint,
and a clear fallback when the runtime is missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SegmentWithSAMLib import engines
from SegmentWithSAMLib.errors import ModelError
from SegmentWithSAMLib.geometry import slice_axes
from SegmentWithSAMLib.metrics import dice
from SegmentWithSAMLib.models import load_model
from SegmentWithSAMLib.models.litemedsam import bundled_checkpoint
from SegmentWithSAMLib.session import Session

from conftest import structure_box_ras

pytestmark = pytest.mark.skipif(not engines.has_openvino(), reason="OpenVINO is not installed")


@pytest.fixture(scope="module")
def fast():
    return load_model("litemedsam", "cpu", engine="openvino")


def test_fast_engine_masks_match_the_reference(fast, model, cache, colin, atlas):
    reference, accelerated = Session(colin, model, cache=cache), Session(colin, fast, cache=cache)
    scores = []
    for structure in ("Hippocampus_L", "Putamen_L"):
        for view in ("axial", "coronal", "sagittal"):
            axes = slice_axes(colin, view)
            _, box = structure_box_ras(colin, atlas, axes, structure)
            ours, theirs = accelerated.refine(view, box_ras=box), reference.refine(view, box_ras=box)
            scores.append(dice(theirs.mask2d, ours.mask2d))
    assert fast.engine == "openvino" and np.mean(scores) >= 0.99, scores
    assert fast.encoder_runs == 6  # its embeddings are cached apart from the reference's


def test_point_and_mask_prompts_fall_back_to_the_shared_torch_modules(fast, model):
    embedding = model.encode(torch.rand(1, 3, 256, 256))
    points, labels = np.array([[[100.0, 120.0]]]), np.array([[1]])
    ours, theirs = fast.decode(embedding, points, labels), model.decode(embedding, points, labels)
    assert torch.equal(ours.logits, theirs.logits)


def test_export_is_reused_and_redone_when_the_checkpoint_changes(fast, tmp_path):
    again = engines.export_openvino(fast, bundled_checkpoint(), fast.folder.parent)
    assert again == fast.folder
    state = torch.load(bundled_checkpoint(), map_location="cpu", weights_only=True)
    state = state.get("model", state)
    name = next(k for k in state if k.startswith("image_encoder") and k.endswith("weight"))
    state[name] = state[name] * 1.01
    changed = tmp_path / "tuned.pth"
    torch.save(state, changed)
    tuned = load_model(changed, "cpu", engine="openvino")
    assert tuned.folder != fast.folder and tuned.folder.parent == fast.folder.parent
    image = torch.rand(1, 3, 256, 256)
    assert not np.allclose(tuned.encode(image).numpy(), fast.encode(image).numpy())


def test_missing_runtime_falls_back_to_pytorch_with_a_notice(monkeypatch, capsys):
    cpu = torch.device("cpu")
    assert engines.resolve_engine("auto", cpu) == "openvino"
    monkeypatch.setattr(engines, "has_openvino", lambda: False)
    assert engines.available_engines() == ["torch"]
    assert engines.resolve_engine("auto", cpu) == "torch"
    assert "OpenVINO is not installed; using PyTorch" in capsys.readouterr().err
    with pytest.raises(ModelError, match="pip install openvino"):
        engines.resolve_engine("openvino", cpu)
    with pytest.raises(ModelError, match="Unknown engine 'tensorrt'"):
        engines.resolve_engine("tensorrt", cpu)


def test_a_failed_export_falls_back_when_automatic_and_is_an_error_when_asked(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("Module onnx is not installed!")

    monkeypatch.setattr(engines, "export_openvino", broken)
    model = load_model("litemedsam", "cpu", engine="auto")
    assert model.engine == "torch"
    assert "could not be prepared (RuntimeError: Module onnx is not installed!); using PyTorch" in \
        capsys.readouterr().err
    with pytest.raises(ModelError, match="use --engine torch"):
        load_model("litemedsam", "cpu", engine="openvino")
