"""SAM 2.1 and MedSAM2: checkpoints the test builds (random weights; real ones are not available offline) loaded
through the real loader, single-slice prediction that matches the sam2 package's own image predictor, and
propagation with SAM 2's video predictor fed from memory on a small Colin27 crop: both directions, streaming,
and through the engine cancel (which changes nothing), range and key slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SegmentWithSAMLib.actions import UserEdit
from SegmentWithSAMLib.api import Segmenter
from SegmentWithSAMLib.errors import CheckpointError, ModelError, PromptError
from SegmentWithSAMLib.geometry import Volume
from SegmentWithSAMLib.loading import load_model
from SegmentWithSAMLib.propagation import Cancelled, Propagator, StopRules
from SegmentWithSAMLib.session import Session
from SegmentWithSAMLib.state import Kind

from conftest import structure_box_ras

pytest.importorskip("sam2", reason="SAM 2 models need the sam2 package (scripts/setup.sh installs it)")

NEVER_STOP = StopRules(min_similarity=None, min_score=None, max_area_ratio=None, min_overlap=None, max_empty=10**6)


def _save(variant: str, path, *, extra_blocks: int = 0):
    from SegmentWithSAMLib.models.sam2 import build_network

    torch.manual_seed(0)
    state = build_network(variant).state_dict()
    prefix = "image_encoder.trunk.blocks."
    for extra in range(extra_blocks):  # a deeper trunk, as a bigger variant has
        state.update({k.replace(f"{prefix}11.", f"{prefix}{12 + extra}."): v for k, v in state.items()
                      if k.startswith(f"{prefix}11.")})
    torch.save({"model": state}, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sam2")
    return {"tiny": _save("sam2.1_hiera_t", folder / "sam2.1_hiera_tiny.pt"),
            "deeper": _save("sam2.1_hiera_t", folder / "deeper.pt", extra_blocks=4)}


@pytest.fixture(scope="module")
def medsam2(checkpoints):
    return load_model("medsam2", "cpu", engine="torch", checkpoint=checkpoints["tiny"])


@pytest.fixture(scope="module")
def crop(colin, atlas):
    """Colin27 around the left putamen: 8 axial slices of 96 × 96 voxels (the seed's on the middle one, four below
    it and three above: enough for every check, each slice tracked costs seconds), with the AAL labels."""
    labels = atlas.array == 73
    k = int(np.median(np.flatnonzero(labels.any(axis=(1, 2)))))
    window = np.s_[k - 4: k + 4, 50:146, 40:136]
    shift = np.eye(4)
    shift[:3, 3] = [window[2].start, window[1].start, window[0].start]
    image = Volume(colin.array[window].copy(), colin.ijk_to_ras @ shift)
    return image, atlas.array[window]


def test_checkpoints_load_by_name_and_by_path_and_wrong_ones_are_refused(checkpoints):
    tiny = load_model(checkpoints["tiny"], "cpu", engine="torch")  # the variant is read from the weights
    assert tiny.name == "sam2.1_hiera_t" and tiny.input_size == 1024 and tiny.low_res_size == 256
    with pytest.raises(CheckpointError, match="looks like a sam2.1_hiera_s checkpoint; you chose sam2.1_hiera_t"):
        load_model("sam2.1_tiny", "cpu", engine="torch", checkpoint=checkpoints["deeper"])
    with pytest.raises(CheckpointError, match="not a SAM checkpoint"):
        load_model("sam_vit_b", "cpu", engine="torch", checkpoint=checkpoints["tiny"])
    truncated = checkpoints["tiny"].with_name("truncated.pt")
    truncated.write_bytes(checkpoints["tiny"].read_bytes()[: 1 << 20])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_model("sam2.1_tiny", "cpu", engine="torch", checkpoint=truncated)
    with pytest.raises(CheckpointError, match="medsam2 is not installed: get MedSAM2_latest.pt from https://"):
        load_model("medsam2", "cpu", engine="torch")


def test_sam2_models_run_in_pytorch_even_on_a_cpu_with_openvino(checkpoints):
    assert load_model(checkpoints["tiny"], "cpu", engine="auto").engine == "torch"
    with pytest.raises(ModelError, match="does not run sam2.1_hiera_t"):
        load_model(checkpoints["tiny"], "cpu", engine="openvino")


def test_slice_prediction_matches_the_sam2_image_predictor(medsam2):
    """The packed features and the decoder call give what sam2's own SAM2ImagePredictor gives."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    size = medsam2.input_size
    image = np.random.default_rng(1).random((size, size, 3), dtype=np.float32)
    reference = SAM2ImagePredictor(medsam2.net)
    reference._bb_feat_sizes = [(size // 4,) * 2, (size // 8,) * 2, (size // 16,) * 2]
    reference.set_image(image)
    box, point = np.array([100.0, 120.0, 300.0, 340.0]), np.array([[200.0, 230.0]])
    _, ref_scores, ref_logits = reference.predict(point_coords=point, point_labels=np.array([1]), box=box,
                                                  multimask_output=False)
    embedding = medsam2.encode(np.ascontiguousarray(image.transpose(2, 0, 1)[None]))
    assert embedding.shape == (1, 1024, size // 16, size // 16)
    ours = medsam2.decode(embedding, point[None], np.array([[1]]), box[None])
    np.testing.assert_allclose(ours.logits[0], ref_logits, atol=1e-3)
    np.testing.assert_allclose(ours.scores[0], ref_scores, atol=1e-4)


def test_a_box_on_a_colin27_slice_gives_a_mask_on_that_slice(medsam2, colin, atlas):
    session = Session(colin, medsam2)
    axes = session.axes("sagittal")
    index, box = structure_box_ras(colin, atlas, axes, "Putamen_L")
    seg = Segmenter(colin, medsam2, "sagittal", session=session)
    update = seg.prompt("putamen", box_ras=box)
    assert list(update.changed) == [index] and update.changed[index].shape == axes.image_shape
    assert session.predictor._embedding.shape == (1, 1024, 32, 32)
    volume_mask = seg.mask("putamen")
    assert volume_mask.shape == colin.array.shape and not axes.oriented(volume_mask)[index + 1].any()


def test_video_propagation_both_ways_streams_and_encodes_each_slice_once(medsam2, crop):
    image, labels = crop
    session = Session(image, medsam2)
    axes = session.axes("axial")
    middle = axes.num_slices // 2
    seed = axes.oriented(labels == 73)[middle]
    assert seed.any()
    propagator = Propagator(session, "axial", NEVER_STOP)
    before = medsam2.encoder_runs
    streamed = []
    for step in propagator.steps((middle, seed), "both"):
        streamed.append(step)
        if len(streamed) == 1:  # streamed: the first slice comes before the rest are tracked
            assert medsam2.encoder_runs - before <= 2
    # each direction is one pass over its slices (the seed slice opens both): one encoder run per slice
    assert medsam2.encoder_runs - before == axes.num_slices + 1
    indices = [step.index for step in streamed]
    assert indices == sorted(indices, key=lambda i: (i < middle, abs(i - middle))) and middle not in indices
    assert min(indices) < middle < max(indices)  # both ways (random weights: a slice may come out empty)
    assert propagator.stopped == {"up": "range end", "down": "range end"}
    assert all(step.mask.shape == axes.image_shape and step.mask.dtype == bool for step in streamed)
    assert all(0.0 <= step.score <= 1.0 for step in streamed)  # SAM 2's object-presence probability


def test_video_propagation_cancels_within_a_slice_and_keeps_range_and_key_slices(medsam2, crop):
    """Through the engine, as every front end propagates: a cancelled step changes nothing; a key slice ends its
    direction and is never overwritten, nor is anything written outside the range."""
    image, labels = crop
    session = Session(image, medsam2)
    axes = session.axes("axial")
    middle = axes.num_slices // 2
    seed = axes.oriented(labels == 73)[middle]
    seg = Segmenter(image, medsam2, "axial", rules=NEVER_STOP, session=session)
    seg.step("p", UserEdit({middle: seed}))
    state = seg.states["p"]
    seen, before = [], medsam2.encoder_runs
    with pytest.raises(Cancelled):  # down: four slices there, cancelled after three
        seg.propagate("p", middle, "down", on_slice=lambda index, mask: seen.append(index),
                      cancel=lambda: len(seen) >= 3)
    assert len(seen) == 3 and max(seen) < middle and medsam2.encoder_runs - before <= 1 + 3 + 1
    assert seg.states["p"] is state and list(state.masks) == [middle]

    seg.step("p", UserEdit({middle - 3: seed}))
    update = seg.propagate("p", middle, "both", (middle - 4, middle + 2))
    assert update.changed and set(update.changed) <= {middle - 2, middle - 1, middle + 1, middle + 2}
    assert update.stopped == {"down": f"key slice {middle - 3}", "up": "range end"}
    kept = seg.states["p"]
    assert all(np.array_equal(kept.masks[i], seed) and kept.kinds[i] is Kind.USER for i in (middle, middle - 3))
    assert set(kept.masks) == {middle, middle - 3, *update.changed}
    with pytest.raises(PromptError, match="skip works with models without a memory"):
        Propagator(session, "axial", NEVER_STOP, skip=2)
    with pytest.raises(PromptError, match="skip works with models without a memory"):
        seg.propagate("p", middle, "up", skip=2)


def test_propagate_command_picks_sam2_by_name(medsam2, crop, checkpoints, tmp_path, capsys):
    import json

    from SegmentWithSAMLib.cli import main
    from SegmentWithSAMLib.io import write_labelmap, write_volume

    image, labels = crop
    volume_path, seed_path, out = tmp_path / "crop.nii.gz", tmp_path / "seed.nii.gz", tmp_path / "out.nii.gz"
    write_volume(image, volume_path)
    seed = np.zeros(labels.shape, dtype=np.uint8)
    middle = labels.shape[0] // 2
    seed[middle] = labels[middle] == 73
    write_labelmap(seed, image, seed_path)
    code = main(["propagate", str(volume_path), "--mask", str(seed_path), "--view", "axial", "--range",
                 f"{middle - 1}:{middle + 1}", "--model", "medsam2", "--checkpoint", str(checkpoints["tiny"]),
                 "--device", "cpu", "--out", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["slices"] <= 2 and out.is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sam_vit_l", "sam_vit_h", "sam2.1_small", "sam2.1_base_plus", "sam2.1_large"])
def test_every_other_architecture_loads_through_the_real_loader_and_predicts(name, tmp_path, colin, atlas):
    """The bigger variants (checkpoints of 0.2–2.5 GB, so not in the default run), built and saved here."""
    from SegmentWithSAMLib.models import registry
    from SegmentWithSAMLib.models.sam2 import build_network

    architecture = registry()[name].architecture
    torch.manual_seed(0)
    if architecture.startswith("sam2"):
        state = build_network(architecture).state_dict()
    else:
        from segment_anything import sam_model_registry

        state = sam_model_registry[architecture.removeprefix("sam_")]().state_dict()
    path = tmp_path / f"{name}.pt"
    torch.save(state, path)
    del state
    model = load_model(path, "cpu", engine="torch")
    assert model.name == architecture
    session = Session(colin, model)
    axes = session.axes("axial")
    index, box = structure_box_ras(colin, atlas, axes, "Putamen_L")
    update = Segmenter(colin, model, "axial", session=session).prompt("putamen", box_ras=box)
    assert list(update.changed) == [index] and update.changed[index].shape == axes.image_shape
