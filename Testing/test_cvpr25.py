"""The CVPR 2025 challenge format: safe npz reading and its bad-input matrix, the disk embedding cache,
``segmentwithsam cvpr25`` end to end in fresh processes, and (slow, given the script) the official evaluator
``CVPR25_iter_eval.py`` driving our ``predict.sh`` and scoring as ``challenge.py`` does. The protocol's rules
themselves are pinned in test_challenge.py."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from SegmentWithSAMLib import cvpr25
from SegmentWithSAMLib.cache import EmbeddingCache
from SegmentWithSAMLib.challenge import ChallengeBox, auc, box_from_truth, score, simulate_click_3d
from SegmentWithSAMLib.cli import main
from SegmentWithSAMLib.cvpr25 import VIEW, WINDOW, Case, challenge_layout, read_case, skip_for_budget, write_case
from SegmentWithSAMLib.data import AAL_STRUCTURES
from SegmentWithSAMLib.disk_cache import DiskEmbeddingCache
from SegmentWithSAMLib.errors import PromptError, SegmentWithSAMError, VolumeError
from SegmentWithSAMLib.geometry import Volume, slice_axes
from SegmentWithSAMLib.metrics import dice
from SegmentWithSAMLib.preprocessing import SliceTransform, resolve_window
from SegmentWithSAMLib.propagation import MAX_SKIP
from SegmentWithSAMLib.session import Session

OBJECTS = ("Hippocampus_L", "Amygdala_L")


@pytest.fixture(scope="module")
def colin_case(colin, atlas):
    """A challenge case cut from Colin27: 20 axial slices × 96 × 96 around the left hippocampus, 0–255, with
    the left hippocampus and amygdala as objects 1 and 2 (their AAL voxels in the crop)."""
    image, spacing = challenge_layout(colin)
    labels = slice_axes(atlas, "axial").oriented(atlas.array)
    z, y, x = (int(np.median(c)) for c in np.nonzero(labels == AAL_STRUCTURES["Hippocampus_L"]))
    crop = np.s_[z - 8: z + 12, y - 48: y + 48, x - 48: x + 48]
    truths = [labels[crop] == AAL_STRUCTURES[name] for name in OBJECTS]
    assert all(t.any() for t in truths)
    return np.ascontiguousarray(image[crop]), spacing, truths


def _good_clicks(truths) -> list:
    """Object 1: a foreground click at its centre, then a background click two voxels right of its edge on
    that row; object 2: none."""
    first = truths[0]
    centre, _ = simulate_click_3d(first, np.zeros_like(first))
    d, h, _ = centre
    w = int(np.nonzero(first[d, h])[0].max()) + 2
    assert not truths[1][d, h, w]
    return [[(centre, True), ((d, h, w), False)], []]


def _box_dict(box: ChallengeBox, **change) -> dict:
    return {**{key: np.int64(value) for key, value in box.as_dict().items()}, **change}


class _Payload:
    """Unpickled freely, this would run a shell command that creates ``path``."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def _bad_cases(folder, image, spacing, box: ChallengeBox, payload_flag) -> dict[str, str]:
    """Write the bad-input matrix into ``folder``: file name → a word its error line must hold."""
    depth, height, width = image.shape
    good_box = _box_dict(box)
    cases = {
        "missing_imgs": ({"spacing": spacing, "boxes": [good_box]}, "imgs"),
        "wrong_ndim": ({"imgs": image[0], "spacing": spacing, "boxes": [good_box]}, "shape"),
        "no_spacing": ({"imgs": image, "boxes": [good_box]}, "spacing"),
        "bad_spacing": ({"imgs": image, "spacing": [1.0, 0.0, 1.0], "boxes": [good_box]}, "spacing"),
        "pickled_code": ({"imgs": image, "spacing": spacing, "boxes": [good_box],
                          "clicks": np.array([_Payload(payload_flag)], dtype=object)}, "system"),
        "box_outside": ({"imgs": image, "spacing": spacing, "boxes": [_box_dict(box, z_mid_x_max=width + 5)]},
                        "outside"),
        "box_empty": ({"imgs": image, "spacing": spacing,
                       "boxes": [_box_dict(box, z_mid_x_min=box.z_mid_x_max, z_mid_x_max=box.z_mid_x_min - 1)]},
                      "empty"),
        "box_missing_key": ({"imgs": image, "spacing": spacing,
                             "boxes": [{k: v for k, v in good_box.items() if k != "z_mid"}]}, "z_mid"),
        "click_outside": ({"imgs": image, "spacing": spacing, "boxes": [good_box],
                           "clicks": [{"fg": [[np.int64(depth), np.int64(0), np.int64(0)]], "bg": []}],
                           "clicks_order": [["fg"]]}, "outside"),
        "clicks_without_their_boxes": ({"imgs": image, "spacing": spacing, "boxes": [good_box],
                                        "clicks": [{"fg": [], "bg": []}, {"fg": [[1, 2, 3]], "bg": []}]}, "boxes"),
        "order_mismatch": ({"imgs": image, "spacing": spacing, "boxes": [good_box],
                            "clicks": [{"fg": [[1, 2, 3]], "bg": []}], "clicks_order": [["bg"]]}, "clicks_order"),
        "no_prompts": ({"imgs": image, "spacing": spacing}, "prompts"),
    }
    for name, (arrays, _) in cases.items():
        np.savez_compressed(folder / f"{name}.npz", **arrays)
    (folder / "not_an_npz.npz").write_bytes(b"this is no zip file")
    return {name: word for name, (_, word) in cases.items()} | {"not_an_npz": "npz"}


def _cli(*args, cache_dir) -> subprocess.CompletedProcess:
    env = {**os.environ, "SEGMENTWITHSAM_EMBEDDING_CACHE": str(cache_dir)}
    return subprocess.run([sys.executable, "-m", "SegmentWithSAMLib.cli", "cvpr25", *map(str, args), "--json"],
                          capture_output=True, text=True, env=env, timeout=600)


def test_a_case_reads_back_as_written(tmp_path, colin_case):
    image, spacing, truths = colin_case
    boxes, clicks = [box_from_truth(t) for t in truths], _good_clicks(truths)
    clicks[1] = [None, None]  # no click in either round: the evaluator's None in clicks_order (object perfect)
    write_case(tmp_path / "case.npz", image, spacing, boxes, clicks, prev_pred=np.zeros(image.shape, np.uint8))
    with zipfile.ZipFile(tmp_path / "case.npz") as archive:  # the official layout: pickled object arrays
        assert b"numpy" in archive.read("boxes.npy") and b"fg" in archive.read("clicks.npy")
    case = read_case(tmp_path / "case.npz")
    assert case.image.shape == image.shape and case.spacing == spacing and case.boxes == boxes
    assert case.clicks == clicks and case.objects == 2


def test_the_case_volume_shows_each_slice_as_stored():
    image = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    volume = Case("c.npz", image, (2.0, 0.5, 0.7), None, []).volume()
    axes = slice_axes(volume, "axial")
    assert axes.num_slices == 2 and np.array_equal(axes.oriented(volume.array), image)
    assert axes.pixel_spacing == (0.5, 0.7)
    _, xy = axes.ijk_to_pixel([[3, 1, 1]])  # click (d, h, w) = (1, 1, 3) → column 3, row 1
    assert np.allclose(xy, [[3, 1]])


def test_bad_inputs_are_refused_without_running_pickled_code(tmp_path, colin_case):
    image, spacing, truths = colin_case
    flag = tmp_path / "pwned"
    words = _bad_cases(tmp_path, image, spacing, box_from_truth(truths[0]), flag)
    for name, word in words.items():
        with pytest.raises((VolumeError, PromptError)) as caught:
            read_case(tmp_path / f"{name}.npz")
        assert word in str(caught.value), (name, str(caught.value))
    assert not flag.exists()
    with zipfile.ZipFile(tmp_path / "pickled_code.npz") as archive:  # the payload is real
        assert b"system" in archive.read("clicks.npy")


def test_the_command_reports_each_bad_file_and_writes_nothing_for_them(tmp_path, colin_case):
    image, spacing, truths = colin_case
    inputs, outputs, flag = tmp_path / "in", tmp_path / "out", tmp_path / "pwned"
    inputs.mkdir()
    words = _bad_cases(inputs, image, spacing, box_from_truth(truths[0]), flag)
    outputs.mkdir()
    (outputs / "box_empty.npz").write_bytes(b"stale")  # an earlier step's output must not stand for this one
    done = _cli(inputs, outputs, cache_dir=tmp_path / "cache")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == len(words), lines
    for name, word in words.items():
        line = next(line for line in lines if f" {name}.npz: " in line)
        assert line.startswith("segmentwithsam: error: ") and word in line, line
    assert not flag.exists() and not any(outputs.glob("*.npz"))
    assert len(json.loads(done.stdout)["failed"]) == len(words)


def test_predict_sh_runs_the_command_on_the_challenge_folders(tmp_path):
    inputs, outputs = tmp_path / "inputs", tmp_path / "outputs"
    inputs.mkdir()
    np.savez_compressed(inputs / "case.npz", imgs=np.zeros((2, 4, 4), np.uint8), spacing=np.ones(3))
    script = Path(__file__).resolve().parents[1] / "predict.sh"
    env = {**os.environ, "SEGMENTWITHSAM_INPUTS": str(inputs), "SEGMENTWITHSAM_OUTPUTS": str(outputs)}
    done = subprocess.run(["sh", str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and "case.npz: it has no prompts" in done.stderr, done.stderr
    assert outputs.is_dir() and not any(outputs.glob("*.npz"))


def test_disk_cache_round_trip_and_second_level(tmp_path):
    embedding = torch.randn(1, 8, 4, 4)
    key = ("litemedsam", "torch", SliceTransform((96, 96), (256, 256), 256), ("abc", "axial", 3, (0.0, 255.0)))
    DiskEmbeddingCache("model", tmp_path).put(key, embedding)
    again = DiskEmbeddingCache("model", tmp_path).get(key)  # as a fresh process sees it
    assert again.dtype == np.float32 and np.array_equal(again, embedding.numpy())  # NumPy, as OpenVINO gives
    assert DiskEmbeddingCache("other model", tmp_path).get(key) is None
    memory = EmbeddingCache(disk=DiskEmbeddingCache("model", tmp_path))
    assert key in memory and np.array_equal(memory.get(key), embedding.numpy()) and len(memory) == 1
    assert memory.stats()["disk"]["hits"] == 1
    assert DiskEmbeddingCache("model", tmp_path).path(("volume", object())) is None  # no stable name: memory only


def test_disk_cache_keeps_to_its_bound_least_recently_used_first(tmp_path):
    size = torch.zeros(1, 256).numpy().nbytes + 128  # one entry with its .npy header
    disk = DiskEmbeddingCache("model", tmp_path, max_bytes=3 * size)
    for i in range(3):
        disk.put(("slice", i), torch.full((1, 256), float(i)))
    for i, age in enumerate((300, 100, 200)):  # slice 1 least recently used, then 2, then 0
        os.utime(disk.path(("slice", i)), (1e9 - age, 1e9 - age))
    disk.put(("slice", 3), torch.zeros(1, 256))
    assert sum(path.stat().st_size for path in tmp_path.glob("*.npy")) <= disk.max_bytes
    assert [disk.contains(("slice", i)) for i in range(4)] == [False, True, True, True]
    assert disk.get(("slice", 2)) is not None and os.stat(disk.path(("slice", 2))).st_mtime > 1e9  # a read refreshes
    assert not DiskEmbeddingCache("model", tmp_path, max_bytes=100).put(("big", 0), torch.zeros(1, 256))


def test_a_corrupt_disk_entry_is_ignored_and_replaced(tmp_path):
    disk, key = DiskEmbeddingCache("model", tmp_path), ("slice", 7)
    disk.put(key, torch.ones(1, 4, 2, 2))
    path = disk.path(key)
    path.write_bytes(path.read_bytes()[:-9])  # truncated
    assert disk.get(key) is None and disk.corrupt == 1 and not path.exists()
    disk.put(key, torch.ones(1, 4, 2, 2))
    assert np.array_equal(disk.get(key), np.ones((1, 4, 2, 2), np.float32))
    with open(path, "wb") as file:  # a file that is a pickle, not an array: never unpickled
        pickle.dump({"x": 1}, file)
    assert disk.get(key) is None


def test_disk_keys_follow_the_pixels():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (4, 16, 16)).astype(np.uint8)
    changed = array.copy()
    changed[2, 5, 5] += 1
    disk = DiskEmbeddingCache("model", "/nonexistent")
    window = resolve_window(array, "255,127.5")
    transform = SliceTransform((16, 16), (256, 256), 256)

    def path(a):
        volume = Volume(a, np.diag([-1.0, -1.0, 2.0, 1.0]))
        return disk.path(("litemedsam", "openvino", transform, (volume.identity, "axial", 2, window.key)))

    assert path(array) == path(array.copy()) and path(array) != path(changed)


def test_the_command_predicts_a_colin27_case_and_a_second_call_encodes_nothing(tmp_path, colin_case):
    image, spacing, truths = colin_case
    inputs, outputs, flag = tmp_path / "in", tmp_path / "out", tmp_path / "pwned"
    inputs.mkdir()
    write_case(inputs / "colin.npz", image, spacing, [box_from_truth(t) for t in truths], _good_clicks(truths))
    words = _bad_cases(inputs, image, spacing, box_from_truth(truths[0]), flag)
    first = _cli(inputs, outputs, cache_dir=tmp_path / "cache")
    assert first.returncode == 2 and len(first.stderr.strip().splitlines()) == len(words), first.stderr
    assert sorted(p.name for p in outputs.glob("*.npz")) == ["colin.npz"] and not flag.exists()
    with np.load(outputs / "colin.npz", allow_pickle=False) as result:
        assert list(result.keys()) == ["segs"]
        segs = result["segs"]
    assert segs.shape == image.shape and segs.dtype == np.uint8 and set(np.unique(segs)) <= {0, 1, 2}
    dices = [dice(segs == i + 1, truth) for i, truth in enumerate(truths)]
    assert dices[0] > 0.5 and dices[1] > 0.35, dices  # measured 0.60 (a box and two clicks) and 0.47 (a box)
    report = json.loads(first.stdout)
    assert report["files"][0]["encoded"] > 0
    second = _cli(inputs, outputs, cache_dir=tmp_path / "cache")
    again = json.loads(second.stdout)
    print(f"cvpr25 on a {image.shape} case: first call {report['seconds']:.1f} s "
          f"({report['files'][0]['encoded']} slices encoded), second {again['seconds']:.1f} s; Dice {dices}")
    assert again["files"][0]["encoded"] == 0 and again["files"][0]["prompts_applied"] == 0  # states on disk
    with np.load(outputs / "colin.npz", allow_pickle=False) as result:
        assert np.array_equal(result["segs"], segs)
    # The next challenge step: the same prompts and one click more, in a fresh process, applies that click only;
    # the other object, perfect as far as the evaluator knows, gets no click that round (None in its order).
    clicks = _good_clicks(truths)
    clicks[0].append((clicks[0][0][0], True))
    clicks[1].append(None)
    for path in inputs.glob("*.npz"):
        path.unlink()
    write_case(inputs / "colin.npz", image, spacing, [box_from_truth(t) for t in truths], clicks)
    step = json.loads(_cli(inputs, outputs, cache_dir=tmp_path / "cache").stdout)
    assert step["files"][0]["prompts_applied"] == 1 and step["files"][0]["encoded"] == 0


def test_boxes_skip_slices_only_where_encoding_every_one_would_overrun_the_time_budget(colin_case, default_model,
                                                                                       monkeypatch, capsys):
    """The skip the boxes get: 0 for a 20-slice case (its slices take seconds to encode, the budget is minutes),
    the most where even one slice's encoding overruns it; a plan encodes slices the boxes need, for good. A skip
    out of range is refused before anything runs."""
    with pytest.raises(SystemExit):
        main(["cvpr25", "in", "out", "--skip", "7"])
    assert "from 0 to 4 or auto, not '7'" in capsys.readouterr().err
    image, spacing, truths = colin_case
    case = Case("colin.npz", image, spacing, [box_from_truth(t) for t in truths], [[], []])
    session = Session(case.volume(), default_model, WINDOW, EmbeddingCache())
    assert skip_for_budget(session, case.boxes, case.objects) == 0
    assert session.is_cached(VIEW, case.boxes[0].z_mid)  # the first box's own slice, needed in any case
    monkeypatch.setattr(cvpr25, "BUDGET_S", 1e-6)
    assert skip_for_budget(session, case.boxes, case.objects) == MAX_SKIP


def test_interaction_states_round_trip_on_disk_by_prompts(tmp_path):
    from SegmentWithSAMLib.interaction_store import InteractionStore
    from SegmentWithSAMLib.state import Kind, ObjectState

    class Model:
        name, engine = "litemedsam", "openvino"

    store = InteractionStore(Model(), "volume-hash", WINDOW, "axial", folder=tmp_path, max_files=2)
    mask = np.zeros((4, 5), bool)
    mask[1:3, 2:4] = True
    state = ObjectState((2, 6), {3: mask}, {3: Kind.KEY}, {3: [(2.0, 1.0, True)]}, {3: None}, np.ones(4),
                        (3, np.array([1.0, 1, 4, 3])))
    prompts = [["box", "object_1", {"z_mid": 3}], ["click", "object_1", [3, 1, 2], True]]
    store.put(prompts, {"object_1": state})
    restored = store.get(prompts, (4, 5))["object_1"]
    assert np.array_equal(restored.masks[3], mask) and restored.kinds == {3: Kind.KEY}
    assert restored.clicks == state.clicks and restored.box[0] == 3 and np.array_equal(restored.offset, np.ones(4))
    assert store.get(prompts[:1], (4, 5)) is None  # another prefix, another entry
    for count in range(3):
        store.put([*prompts, count], {"object_1": state})
    assert len(list(tmp_path.glob("*.npz"))) == 2  # the bound
    newest = store._path([*prompts, 2])
    newest.write_bytes(b"not an npz")
    assert store.get([*prompts, 2], (4, 5)) is None and not newest.exists()  # unreadable: a miss, removed


def test_reading_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(SegmentWithSAMError, match="npz"):
        read_case(tmp_path / "absent.npz")


# A `docker` first on PATH for the official evaluator, which runs each step as
#   docker container run ... -v $PWD/inputs/:/workspace/inputs/ -v $PWD/outputs/:/workspace/outputs/ TEAM:latest
#   /bin/bash -c "sh predict.sh"
# through os.system: this runs our predict.sh on those two folders instead, keeping a copy of each step's input in
# $EVALUATOR_STEPS/<step>/; `docker image load` and `docker rmi` do nothing.
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CVPR25_EVAL_SCRIPT"),
                    reason="set CVPR25_EVAL_SCRIPT to the official CVPR25_iter_eval.py (docs/testing.md)")
def test_the_official_evaluator_scores_our_predict_sh_as_challenge_py_does(tmp_path, colin_case):
    """The official script on a two-class Colin27 case, each of its 6 steps running our predict.sh: its table
    equals challenge.py's scores of the predictions it kept (``all_segs``), and the clicks it wrote into each
    step's input equal simulate_click_3d's on the step before (read back by our reader)."""
    import time

    from official_evaluator import run_official  # benchmarks/

    image, spacing, truths = colin_case
    gts = np.zeros(image.shape, np.uint8)
    for label, truth in enumerate(truths, start=1):
        gts[truth] = label
    start = time.perf_counter()
    row, steps = run_official(tmp_path, "colin.npz", image, spacing, gts, True, os.environ["CVPR25_EVAL_SCRIPT"],
                              os.environ.get("CVPR25_EVAL_PYTHON", sys.executable),
                              {"SEGMENTWITHSAM_EMBEDDING_CACHE": str(tmp_path / "cache")})
    seconds = time.perf_counter() - start
    with np.load(tmp_path / "run" / "seg" / "segmentwithsam" / "colin.npz", allow_pickle=False) as saved:
        all_segs = saved["all_segs"]
    assert all_segs.shape == (6, *image.shape)
    dscs, nsds = zip(*(score(gts, segs, spacing) for segs in all_segs), strict=True)
    print(f"\nCVPR25_iter_eval.py on {image.shape}, 2 classes, {seconds:.0f} s; step: script DSC/NSD = ours")
    for step in range(6):
        print(f"  {step + 1}: {float(row[f'DSC_{step + 1}']):.4f}/{float(row[f'NSD_{step + 1}']):.4f} = "
              f"{dscs[step]:.4f}/{nsds[step]:.4f}, {float(row[f'RunningTime_{step + 1}']):.1f} s")
    print(f"  AUC {row['DSC_AUC']}/{row['NSD_AUC']}, final {row['DSC_Final']}/{row['NSD_Final']}")
    for step in range(6):
        assert float(row[f"DSC_{step + 1}"]) == pytest.approx(dscs[step], abs=1e-12)
        assert float(row[f"NSD_{step + 1}"]) == pytest.approx(nsds[step], abs=1e-9)
    assert float(row["DSC_AUC"]) == pytest.approx(auc(dscs), abs=1e-12)
    assert float(row["NSD_AUC"]) == pytest.approx(auc(nsds), abs=1e-9)
    assert (float(row["DSC_Final"]), float(row["NSD_Final"])) == (pytest.approx(dscs[-1]), pytest.approx(nsds[-1]))
    boxes = [box_from_truth(t) for t in truths]
    expected: list[list] = [[] for _ in truths]
    for step in range(1, 6):
        for label, clicks in enumerate(expected, start=1):
            clicks.append(simulate_click_3d(gts == label, all_segs[step - 1] == label))
        case = read_case(steps / str(step) / "colin.npz")
        assert case.boxes == boxes and case.clicks == expected, (step, case.clicks, expected)


def test_where_objects_overlap_a_voxel_goes_to_the_one_it_lies_deepest_inside_whatever_their_order():
    from SegmentWithSAMLib.geometry import Volume, slice_axes
    from SegmentWithSAMLib.state import ObjectState, labelmap

    volume = Volume(np.zeros((3, 40, 40), np.int16), np.eye(4))
    axes = slice_axes(volume, "axial")
    big, small = np.zeros((40, 40), bool), np.zeros((40, 40), bool)
    big[2:38, 2:38] = True  # a large object, and a small one lying across its edge
    small[30:40, 10:20] = True
    for order in (["big", "small"], ["small", "big"]):
        states = {"big": ObjectState((0, 2), masks={1: big}), "small": ObjectState((0, 2), masks={1: small})}
        drawn = axes.oriented(labelmap(states, axes, volume.array.shape, order))[1]
        value = {name: order.index(name) + 1 for name in order}
        assert np.array_equal(drawn > 0, big | small)
        assert (drawn[35:38, 14:16] == value["small"]).all()  # the large one's rim: deeper in the small one
        assert (drawn[30:32, 14:16] == value["big"]).all()  # the small one's rim, deeper in the large one
        assert (drawn[10:20, 10:20] == value["big"]).all()
