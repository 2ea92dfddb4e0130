"""One set of prompts on Colin27 through every entry point gives bit-identical masks: the Python API, the command
line, the backend process, ``cvpr25``, a one-row batch, the Slicer controller on real MRML and the web app's
workflow. The prompts: a 2D box, three ordered points (the last negative), a 3D box, and a 3D box with three
clicks (one negative). Every entry point steps the one engine; this test is what keeps it that way.

The volume is Colin27 in the challenge's layout (0–255, axial slices as stored), so ``cvpr25`` reads the very
voxels the others do; all use its identity window. It is cut to the slices the prompts reach (and a few more)
and to the left hippocampus with a margin in-plane: what is compared is the entry points, not the model's
quality, and every entry point reads, sends and shows the whole volume.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage as ndi

from SegmentWithSAMLib.api import Segmenter
from SegmentWithSAMLib.cli import main
from SegmentWithSAMLib.cvpr25 import VIEW, WINDOW, challenge_layout
from SegmentWithSAMLib.data import AAL_STRUCTURES
from SegmentWithSAMLib.disk_cache import DISK_CACHE_DIR_ENV
from SegmentWithSAMLib.geometry import Volume, slice_axes
from SegmentWithSAMLib.io import read_volume, write_volume

HALF = 2  # the 3D box spans the middle slice ± HALF
MARGIN = 40  # voxels kept around the hippocampus in-plane
NAMES = ("box2d", "points", "box3d", "clicks")


def _deepest(region: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.unravel_index(np.argmax(ndi.distance_transform_edt(region)), region.shape))


def _cut(colin: Volume, atlas: Volume) -> tuple[Volume, np.ndarray]:
    """Colin27 in the challenge's layout, (D, H, W) uint8, cut to the left hippocampus's middle slice ± (HALF +
    3) and to its extent there ± MARGIN in-plane (RAS positions kept), and the hippocampus in the same voxels."""
    image, spacing = challenge_layout(colin)
    labels = slice_axes(atlas, VIEW).oriented(atlas.array) == AAL_STRUCTURES["Hippocampus_L"]  # the same layout
    slices = np.flatnonzero(labels.any(axis=(1, 2)))
    mid = int(slices[len(slices) // 2])
    rows, cols = np.nonzero(labels[mid])
    d0, h0, w0 = mid - HALF - 3, max(int(rows.min()) - MARGIN, 0), max(int(cols.min()) - MARGIN, 0)
    cut = np.s_[d0: mid + HALF + 4, h0: int(rows.max()) + MARGIN + 1, w0: int(cols.max()) + MARGIN + 1]
    shift = np.eye(4)
    shift[:3, 3] = [w0, h0, d0]  # IJK of the layout is (w, h, d)
    ijk_to_ras = np.diag([-spacing[2], -spacing[1], spacing[0], 1.0]) @ shift
    return Volume(np.ascontiguousarray(image[cut]), ijk_to_ras), labels[cut]


@pytest.fixture(scope="module")
def case(colin, atlas, tmp_path_factory, default_model):
    """The volume (written as NIfTI and read back), the prompts in slice pixels and RAS, and the Python API's
    masks (KJI bool) for each prompt set: the reference every other entry point must equal."""
    folder = tmp_path_factory.mktemp("parity")
    layout, labels = _cut(colin, atlas)
    write_volume(layout, folder / "colin.nii.gz")
    volume = read_volume(folder / "colin.nii.gz")
    assert np.array_equal(volume.array, layout.array) and np.allclose(volume.ijk_to_ras, layout.ijk_to_ras)
    axes = slice_axes(volume, VIEW)
    truth = axes.oriented(labels)
    slices = np.flatnonzero(truth.any(axis=(1, 2)))
    mid = int(slices[len(slices) // 2])
    assert mid == HALF + 3  # the middle of the cut
    rows, cols = np.nonzero(truth[mid])
    box = [int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())]  # x0, y0, x1, y1 (inclusive)

    def ras(d, h, w):  # a voxel of the (D, H, W) layout in RAS: index (d, h, w) is IJK (w, h, d)
        return volume.to_ras([[w, h, d]])[0]

    corners = np.array([ras(mid, box[1], box[0]), ras(mid, box[3], box[2])])
    inside = _deepest(truth[mid])
    points = [(mid, *inside), (mid, inside[0], max(inside[1] - 2, 0)), (mid, box[1], box[0])]
    labels = [1, 1, 0]
    segmenter = Segmenter(volume, default_model, VIEW, WINDOW)  # the engine every entry point picks
    segmenter.prompt("box2d", box_ras=corners)
    segmenter.prompt("points", [ras(*p) for p in points], labels)
    segmenter.box3d("box3d", corners, (mid - HALF, mid + HALF))
    segmenter.box3d("clicks", corners, (mid - HALF, mid + HALF))
    clicks = []
    band = np.zeros_like(truth)
    band[mid - HALF: mid + HALF + 1] = truth[mid - HALF: mid + HALF + 1]
    for positive in (True, False, True):  # the largest error's deepest voxel, of the kind asked for
        predicted = segmenter.states["clicks"].oriented_mask(axes.num_slices, axes.image_shape)
        error = (band & ~predicted) if positive else (predicted & ~band)
        assert error.any(), "the box left no error of this kind to click on"
        click = (_deepest(error), positive)
        clicks.append(click)
        segmenter.click("clicks", ras(*click[0]), positive)
    masks = {name: segmenter.mask(name) for name in NAMES}
    assert all(m.any() for m in masks.values()) and not np.array_equal(masks["box3d"], masks["clicks"])
    return {"folder": folder, "volume": volume, "axes": axes, "mid": mid, "box": box, "corners": corners,
            "points": [ras(*p) for p in points], "labels": labels, "clicks": [(ras(*c), p) for c, p in clicks],
            "index_clicks": clicks, "masks": masks}


def _same(case, name: str, mask: np.ndarray, where: str) -> None:
    reference = case["masks"][name]
    differ = int(np.count_nonzero(np.asarray(mask, bool) != reference))
    assert differ == 0, f"{where}: {name} differs from the Python API's in {differ} voxels"


def _csv(values) -> str:
    return ",".join(repr(float(v)) for v in np.ravel(values))


def test_command_line(case, engine_cache):
    folder, mid = case["folder"], case["mid"]
    box3d = [f"--box={_csv(case['corners'])}", f"--range={mid - HALF}:{mid + HALF}", "--propagate", "both"]
    runs = {"box2d": [f"--box={_csv(case['corners'])}"],
            "points": [f"--{'point' if label else 'negative'}={_csv(point)}"
                       for point, label in zip(case["points"], case["labels"], strict=True)],
            "box3d": box3d,
            "clicks": [*box3d, *[f"--{'click' if positive else 'click-negative'}={_csv(point)}"
                                 for point, positive in case["clicks"]]]}
    for name, args in runs.items():
        out = folder / f"cli-{name}.nii.gz"
        argv = ["segment", str(folder / "colin.nii.gz"), "--view", "axial", f"--window={WINDOW}", "--device", "cpu",
                "--json", *args, "--out", str(out)]
        if name == "clicks":  # the whole chain through the installed command, in a process of its own
            done = subprocess.run([sys.executable, "-m", "SegmentWithSAMLib.cli", *argv], capture_output=True,
                                  text=True, timeout=600)
            assert done.returncode == 0, done.stderr
        else:  # the same command line in this process (a process start and imports less each)
            assert main(argv) == 0
        _same(case, name, read_volume(out).array > 0, "the command line")


def test_backend_process(case):
    from SegmentWithSAMLib.actions import box3d_from_ras, click_from_ras, prompt_from_ras
    from SegmentWithSAMLib.backend.client import BackendClient

    volume, axes, mid = case["volume"], case["axes"], case["mid"]
    actions = {"box2d": [prompt_from_ras(volume, axes, None, None, case["corners"])],
               "points": [prompt_from_ras(volume, axes, case["points"], case["labels"])],
               "box3d": [box3d_from_ras(volume, axes, case["corners"], (mid - HALF, mid + HALF))]}
    actions["clicks"] = [*actions["box3d"], *[click_from_ras(volume, axes, p, positive)
                                              for p, positive in case["clicks"]]]
    with BackendClient(device="cpu", dispatch="thread") as client:
        for name, steps in actions.items():
            state = None
            for action in steps:
                state, _ = client.wait(client.step(volume, VIEW, name, state, action, WINDOW), 600)
            mask = np.zeros(volume.array.shape, bool)
            axes.oriented(mask)[:] = state.oriented_mask(axes.num_slices, axes.image_shape)
            _same(case, name, mask, "the backend")


def test_cvpr25(case, engine_cache):
    from SegmentWithSAMLib.challenge import ChallengeBox
    from SegmentWithSAMLib.cvpr25 import write_case

    folder, mid, (x0, y0, x1, y1) = case["folder"], case["mid"], case["box"]
    image = case["axes"].oriented(case["volume"].array)
    spacing = [case["axes"].spacing_ijk[a] for a in (case["axes"].slice_axis, case["axes"].row_axis,
                                                        case["axes"].col_axis)]
    inputs, outputs = folder / "cvpr-in", folder / "cvpr-out"
    inputs.mkdir()
    one = ChallengeBox(mid, mid, mid, x0, y0, x1, y1)  # a 3D box one slice thick is the 2D box
    three = ChallengeBox(mid - HALF, mid + HALF, mid, x0, y0, x1, y1)
    write_case(inputs / "box2d.npz", image, spacing, [one])
    write_case(inputs / "box3d.npz", image, spacing, [three])
    write_case(inputs / "clicks.npz", image, spacing, [three], [case["index_clicks"]])
    done = subprocess.run([sys.executable, "-m", "SegmentWithSAMLib.cli", "cvpr25", str(inputs), str(outputs),
                           "--device", "cpu", "--json"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, DISK_CACHE_DIR_ENV: str(folder / "cache")})
    assert done.returncode == 0, done.stderr
    for name in ("box2d", "box3d", "clicks"):
        with np.load(outputs / f"{name}.npz") as result:
            segs = result["segs"]
        mask = np.zeros(case["volume"].array.shape, bool)
        case["axes"].oriented(mask)[:] = segs == 1
        _same(case, name, mask, "cvpr25")


def test_one_row_batches(case):
    from SegmentWithSAMLib.batch import run_batch

    folder, mid = case["folder"], case["mid"]
    base = {"volume": str(folder / "colin.nii.gz"), "view": "axial", "window": WINDOW, "device": "cpu"}
    negatives = [p for p, label in zip(case["points"], case["labels"], strict=True) if not label]
    rows = [{**base, "name": "box2d", "box": _csv(case["corners"]), "direction": "none"},
            {**base, "name": "points", "direction": "none", "negatives": ";".join(_csv(p) for p in negatives),
             "points": ";".join(_csv(p) for p, label in zip(case["points"], case["labels"], strict=True) if label)},
            {**base, "name": "box3d", "box": _csv(case["corners"]), "range": f"{mid - HALF}:{mid + HALF}"}]
    report = run_batch(rows, folder / "batch", workers=1)
    assert all(row["status"] == "ok" for row in report.rows), report.rows
    for row in report.rows:
        _same(case, row["name"], read_volume(row["output"]).array > 0, "the batch")


def _roi(scene, case, thick: bool):
    """An ROI as a user drags it: the box's corners in-plane, spanning the range's slice centres if ``thick``."""
    mid, (x0, y0, x1, y1) = case["mid"], case["box"]
    low, high = (mid - HALF, mid + HALF) if thick else (mid, mid)
    volume = case["volume"]
    corners = volume.to_ras([[x0, y0, low], [x1, y1, high]])  # IJK = (w, h, d) of the layout
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(*corners.mean(axis=0))
    roi.SetSize(*np.abs(corners[1] - corners[0]))
    return roi


def _points(scene, case):
    positive = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    negative = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    for point, label in zip(case["points"], case["labels"], strict=True):
        (positive if label else negative).AddControlPoint(*point)
    return positive, negative


def test_slicer_controller_on_real_mrml(case, scene, controller):
    slicer = pytest.importorskip("slicer")
    from SegmentWithSAMSlicerLib import mrml

    volume_node = slicer.modules.volumes.logic().AddArchetypeVolume(str(case["folder"] / "colin.nii.gz"), "parity")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    for name in NAMES:
        segment_id = segmentation.GetSegmentation().AddEmptySegment(name, name)
        if name == "points":
            positive, negative = _points(scene, case)
            controller.request_preview(volume_node, positive, negative, None, "axial", WINDOW,
                                       segmentation_node=segmentation, segment_id=segment_id)
        else:
            controller.request_preview(volume_node, None, None, _roi(scene, case, name != "box2d"), "axial", WINDOW,
                                       segmentation_node=segmentation, segment_id=segment_id)
        controller.wait()
        controller.accept(segmentation, segment_id)
        if name in ("box3d", "clicks"):
            controller.propagate(volume_node, segmentation, segment_id, window=WINDOW)
            controller.wait()
        if name == "clicks":
            for point, positive in case["clicks"]:
                controller.click_3d(volume_node, segmentation, segment_id, point, positive, window=WINDOW)
            controller.wait()
            controller.accept(segmentation, segment_id)
        _same(case, name, mrml.segment_array(segmentation, segment_id, volume_node), "the Slicer controller")


def test_web_workflow(case, engine_cache):
    pytest.importorskip("trame_slicer", reason="needs the web extra (pip install -e .[web])")
    from SegmentWithSAMLib.backend.client import BackendClient
    from SegmentWithSAMSlicerLib import mrml
    from SegmentWithSAMWeb.app import WebOptions
    from SegmentWithSAMWeb.browser import show_slice
    from SegmentWithSAMWeb.embedded import EmbeddedApp

    app = EmbeddedApp(WebOptions(host="127.0.0.1", port=0, key="parity-key", data=str(case["folder"]),
                                 device="cpu"), client_factory=lambda model, device: BackendClient(model, "cpu"))
    try:
        workflow = app.app.workflow

        def start() -> None:
            workflow.load_volume(case["volume"], "parity")
            workflow.settings.model_window = WINDOW
            show_slice(app.app, "Red", case["corners"][0])  # the axial view on the prompts' slice

        app.call(start)
        for name in NAMES:
            def prompts(name=name) -> None:
                segment_id = workflow.add_segment() if name != NAMES[0] else workflow.editor.active_segment_id
                workflow.editor.set_active_segment_id(segment_id)
                if name == "points":
                    for point, label in zip(case["points"], case["labels"], strict=True):
                        workflow.prompts["positive" if label else "negative"].AddControlPoint(*point)
                else:
                    roi = _roi(workflow.scene, case, name != "box2d")
                    workflow.prompts["box"].SetCenter(roi.GetCenter())
                    workflow.prompts["box"].SetSize(roi.GetSize())
                    workflow.scene.RemoveNode(roi)

            app.call(prompts)
            app.until(lambda: workflow.controller.preview_result is not None, what=f"the {name} preview")
            app.call(workflow.accept)
            if name in ("box3d", "clicks"):
                app.call(workflow.propagate)
                app.until(lambda: workflow.controller.propagation is None, what="the propagation")
            if name == "clicks":
                def click(point, positive) -> None:
                    workflow.prompts["positive" if positive else "negative"].AddControlPoint(*point)

                for count, (point, positive) in enumerate(case["clicks"], start=1):
                    app.call(lambda p=point, q=positive: click(p, q))
                    app.until(lambda n=count: len(workflow.front._sent_clicks) == n  # this click was sent, and done
                              and workflow.controller.refinement is not None
                              and workflow.controller.refinement.handle is None
                              and not workflow.controller.refinement.waiting, what="the click")
                app.call(workflow.accept)
            mask = app.call(lambda: mrml.segment_array(workflow.segmentation_node, workflow.editor.active_segment_id,
                                                       workflow.volume_node))
            _same(case, name, mask, "the web app")
    finally:
        app.close()
