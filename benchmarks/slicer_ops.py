"""The GUI-thread work of the Slicer side (``SegmentWithSAMSlicerLib``) on a CT-sized scene, model time excluded:
a prompt event → its preview shown, Accept of one slice, Accept of a 100-slice propagation, and undo of each.

The scene is real MRML (``slicer-core``): a 512 × 512 × 300 CT-like volume (0.7 × 0.7 × 1 mm) and a segmentation
of 10 segments. The controller (:class:`SegmentWithSAMSlicerLib.logic.SegmentationController`) runs as the
module runs it, but its backend client is a replay that answers each step at once with the result a model would
have sent (a disc on the prompted slice; for propagation, one per slice over 100 slices), so that what is timed
is the controller's own work: reading prompts and the segment, showing previews, the masked undoable writes.

- prompt → preview: what the desktop module does on a prompt event (``segment_has_mask``, then
  ``request_preview`` for a box on a segment) plus the poll that shows the arrived preview, on a segment as the
  previous event left it (the usual case: placing and moving prompts); "first prompt after an undo": the same
  right after an undo (the segment changed outside the controller: it is read again);
- Accept (1 slice): ``accept`` of that preview into the segment;
- Accept (100 slices): the poll that shows a propagation's last streamed slices and applies it;
- undo: ``undo`` of either.

The volume's segments are imported from arrays, so their labelmap layers span the whole volume, as when read from
a file: the first Accept crops the layers it writes to (as any Segment Editor effect does), which makes the
first repeat's Accept the slowest. Each operation's wall-clock and CPU milliseconds (the process's, all threads)
are kept; CPU time varies less when other jobs share the machine.

    python benchmarks/slicer_ops.py [--repeat 5] [--label before] [--json]

Writes results/slicer_ops[_LABEL].json.
"""

from __future__ import annotations

import argparse
import time
import types

import numpy as np

from SegmentWithSAMLib.backend.client import Handle
from SegmentWithSAMLib.state import Kind, Update

from common import print_table, write_json

SHAPE = (300, 512, 512)  # K, J, I
SPACING = (0.7, 0.7, 1.0)  # I, J, K mm
SEGMENTS = 10
PROPAGATED = 100
TARGETS_MS = {"prompt → preview": 30, "first prompt after an undo": 30, "Accept (1 slice)": 100,
              "Accept (100-slice propagation)": 1000, "undo (1 slice)": 200, "undo (propagation)": 200}


def scene_with_logics():
    """A real MRML scene with the logics Slicer registers, where ``slicer.util`` looks for them."""
    import slicer

    scene = slicer.vtkMRMLScene()
    logics = {}
    for name, cls in (("colors", slicer.vtkSlicerColorLogic), ("segmentations",
                      slicer.vtkSlicerSegmentationsModuleLogic), ("volumes", slicer.vtkSlicerVolumesLogic)):
        logics[name] = cls()
        logics[name].SetMRMLScene(scene)
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(**{name: types.SimpleNamespace(logic=lambda lg=lg: lg)
                                              for name, lg in logics.items()})
    return scene, logics


def ct_like(rng) -> np.ndarray:
    """int16 KJI: air around an elliptic body of soft tissue with noise and a brighter spine."""
    j, i = np.ogrid[: SHAPE[1], : SHAPE[2]]
    body = ((j - 256) / 200.0) ** 2 + ((i - 256) / 230.0) ** 2 <= 1
    spine = ((j - 380) / 25.0) ** 2 + ((i - 256) / 25.0) ** 2 <= 1
    axial = np.where(body, 40, -1000) + np.where(spine, 600, 0)
    return (axial + rng.normal(0, 15, SHAPE)).astype(np.int16)


def segment_masks() -> list[np.ndarray]:
    """10 ellipsoid 'organs' of 40–160 slices spread over the body (KJI bool)."""
    k, j, i = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    masks = []
    for n in range(SEGMENTS):
        centre = (40 + 22 * n, 150 + 22 * (n % 5), 120 + 28 * n)
        radii = (20 + 7 * n, 30 + 3 * (n % 4), 25 + 2 * (n % 3))
        masks.append(((k - centre[0]) / radii[0]) ** 2 + ((j - centre[1]) / radii[1]) ** 2
                     + ((i - centre[2]) / radii[2]) ** 2 <= 1)
    return masks


def disc(rows: int, cols: int, centre: tuple[int, int], radius: int) -> np.ndarray:
    r, c = np.ogrid[:rows, :cols]
    return (r - centre[0]) ** 2 + (c - centre[1]) ** 2 <= radius ** 2


class ReplayClient:
    """Stands where the backend client stands and answers each step at once: ``answer(state, action)`` gives
    the (new state, update, streamed events) a model would have sent. No model, no process."""

    def __init__(self, answer) -> None:
        self.answer, self._ids = answer, 0

    def step(self, volume, view, key, state, action, window=None, target=None) -> Handle:
        self._ids += 1
        new, update, events = self.answer(state, action)
        return Handle(self._ids, "step", state="done", result=(new, update), events=list(events),
                      progress=(len(events), len(events)))

    def poll(self) -> list:
        return []

    def cancel(self, handle) -> None:
        pass

    def close(self) -> None:
        pass


def answer(state, action):
    """A model's answer: a 2D prompt gives a disc on its slice (a key slice); a propagation gives a shrinking
    disc on each of the PROPAGATED slices above the seed (engine slices)."""
    from SegmentWithSAMLib.actions import Prompt, Propagate
    from SegmentWithSAMLib.state import ObjectState

    rows, cols = SHAPE[1], SHAPE[2]  # the axial slice image is (J, I) flipped: a disc does not care
    new = state.copy() if state is not None else ObjectState((0, SHAPE[0] - 1))
    changed = {}
    if isinstance(action, Prompt):
        changed[action.index] = disc(rows, cols, (250, 260), 60)
        new.kinds[action.index] = Kind.KEY
    elif isinstance(action, Propagate):
        for step in range(1, PROPAGATED + 1):
            index = action.index + step
            changed[index] = disc(rows, cols, (250, 260), 60 - step // 4)
            new.kinds[index] = Kind.ENGINE
    else:
        raise ValueError(f"the replay answers prompts and propagations, not {type(action).__name__}")
    new.masks.update(changed)
    events = sorted(changed.items()) if isinstance(action, Propagate) else []
    return new, Update(changed=changed, stopped={"up": "range end"} if events else {}, seconds=0.0), events


def build():
    import slicer

    from SegmentWithSAMSlicerLib.logic import SegmentationController

    rng = np.random.default_rng(0)
    scene, _ = scene_with_logics()
    volume = slicer.util.addVolumeFromArray(ct_like(rng), np.diag([*SPACING, 1.0]), name="CT")
    display = volume.GetDisplayNode() if volume.GetDisplayNode() else None
    if display is not None:
        display.SetWindowLevel(400, 40)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "organs")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    ids = []
    for n, mask in enumerate(segment_masks()):
        segment_id = segmentation.GetSegmentation().AddEmptySegment("", f"organ {n + 1}")
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), segmentation, segment_id, volume)
        ids.append(segment_id)
    segmentation.GetSegmentation().CollapseBinaryLabelmaps(False)  # shared layers, as the Segment Editor keeps them
    controller = SegmentationController(scene, lambda model, device: ReplayClient(answer))
    return scene, volume, segmentation, ids, controller


def timed(times: dict[str, list[float]], cpu: dict[str, list[float]], name: str, fn) -> None:
    """Run ``fn`` once; add its wall-clock milliseconds to ``times[name]`` and the process's CPU milliseconds (all
    threads) to ``cpu[name]``, which vary less when other jobs share the machine."""
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    times[name].append((time.perf_counter() - start) * 1e3)
    cpu[name].append((time.process_time() - start_cpu) * 1e3)


def main() -> None:
    import slicer

    from SegmentWithSAMSlicerLib import mrml

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--label", default="", help="suffix of the JSON file (e.g. before / after)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    began = time.perf_counter()
    scene, volume, segmentation, ids, controller = build()
    print(f"scene built in {time.perf_counter() - began:.1f} s: {SHAPE[2]} × {SHAPE[1]} × {SHAPE[0]} volume, "
          f"{len(ids)} segments in {segmentation.GetSegmentation().GetNumberOfLayers()} labelmap layers")
    target = ids[4]  # organ 5: slices 108–180
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    times: dict[str, list[float]] = {name: [] for name in TARGETS_MS}
    cpu: dict[str, list[float]] = {name: [] for name in TARGETS_MS}
    before = mrml.segment_array(segmentation, target, volume)
    for repeat in range(args.repeat):
        index = 140 + repeat  # an axial slice through organ 5
        centre = volume_ras(volume, (index, 250, 260))
        roi.SetCenter(*centre)
        roi.SetSize(80, 80, 0.5)  # a box on one slice

        def prompt_event():
            mrml.segment_has_mask(segmentation, target, volume)  # the module's test: points → 3D clicks or not
            controller.request_preview(volume, None, None, roi, "axial", segmentation_node=segmentation,
                                       segment_id=target)
            controller.poll()  # the result arrives: shown as the preview

        timed(times, cpu, "first prompt after an undo", prompt_event)  # the first repeat: after loading
        timed(times, cpu, "prompt → preview", prompt_event)
        assert controller.preview_result is not None, controller.status
        timed(times, cpu, "Accept (1 slice)", lambda: controller.accept(segmentation, target))
        assert controller.status.startswith("Accepted"), controller.status
        timed(times, cpu, "undo (1 slice)", controller.undo)

        controller.request_preview(volume, None, None, roi, "axial", segmentation_node=segmentation,
                                   segment_id=target)
        controller.poll()
        controller.accept(segmentation, target)  # the seed slice, not timed
        controller.propagate(volume, segmentation, target, direction="up")
        timed(times, cpu, "Accept (100-slice propagation)", controller.poll)
        assert controller.status.startswith("Propagated"), controller.status
        timed(times, cpu, "undo (propagation)", controller.undo)
        controller.undo()  # the seed slice
    assert np.array_equal(mrml.segment_array(segmentation, target, volume), before), "undo did not restore"
    rows = [[name, float(np.median(ms)), float(np.min(ms)), float(np.max(ms)), float(np.median(cpu[name])),
             TARGETS_MS[name], "yes" if np.median(ms) <= TARGETS_MS[name] else "no"] for name, ms in times.items()]
    print_table(["operation", "median ms", "min ms", "max ms", "median CPU ms", "target ms", "met"], rows)
    payload = {"volume": list(SHAPE), "segments": SEGMENTS, "propagated_slices": PROPAGATED,
               "slicer_core": getattr(slicer, "__version__", None),
               "ms": times, "cpu_ms": cpu, "targets_ms": TARGETS_MS}
    write_json("slicer_ops" + (f"_{args.label}" if args.label else ""), payload, one_line=args.json)


def volume_ras(volume_node, kji) -> np.ndarray:
    from SegmentWithSAMSlicerLib import mrml

    ijk_to_ras = mrml.world_ijk_to_ras(volume_node)
    return (ijk_to_ras @ [*kji[::-1], 1.0])[:3]


if __name__ == "__main__":
    main()
