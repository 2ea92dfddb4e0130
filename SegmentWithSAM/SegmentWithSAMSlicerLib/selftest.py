"""The module's workflow as a self-test, run inside Slicer (``SegmentWithSAMTest``, CTest) and by pytest
against ``slicer-core``: box → preview → accept → undo → preview for the segment → accept → cancelled
propagation → propagation → click in 3D → accept → undo → undo, on Colin27 (the crop shipped with the core when
Debian's copy is absent; nothing is downloaded). Each step is a step of the one engine on the segment's state."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import slicer
from scipy import ndimage

from SegmentWithSAMLib.data import AAL_STRUCTURES, colin27
from SegmentWithSAMLib.geometry import slice_axes
from SegmentWithSAMLib.metrics import dice

from . import mrml

DICE_FLOOR = 0.5  # the accepted slice vs AAL (0.59 measured with a tight box on the middle axial slice)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def run_workflow(scene, controller, log: Callable[[str], None] = print, device: str | None = None) -> dict:
    """Run the workflow with ``controller`` (a :class:`~.logic.SegmentationController`) on ``scene`` and the
    backend's ``device`` (None: its choice; the in-app test gives "cpu", the device whose packages it checked);
    raises AssertionError at the first step that does not do what it should. Returns what it measured."""
    data = colin27()
    volumes = slicer.modules.volumes.logic()
    volume_node = volumes.AddArchetypeVolume(str(data.image), "Colin27")
    atlas_node = volumes.AddArchetypeVolume(str(data.atlas), "AAL", 1)  # 1: as a labelmap
    volume = controller.volume(volume_node)
    axes = slice_axes(volume, "axial")
    truth = axes.oriented(slicer.util.arrayFromVolume(atlas_node) == AAL_STRUCTURES["Hippocampus_L"])
    index = int(np.flatnonzero(truth.any(axis=(1, 2))).mean())
    rows, cols = np.nonzero(truth[index])
    corners = volume.to_ras(axes.pixel_to_ijk(index, [[cols.min(), rows.min()], [cols.max(), rows.max()]]))
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "SAM box")
    roi.SetCenter(*corners.mean(axis=0))
    roi.SetSize(*np.abs(corners[1] - corners[0]))

    log("Box → preview → accept")
    controller.request_preview(volume_node, None, None, roi, "axial", device=device)
    controller.wait()
    _check(controller.preview_result is not None, f"no preview: {controller.status}")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    segmentation.CreateDefaultDisplayNodes()
    segment_id = controller.accept(segmentation, None)
    mask = axes.oriented(mrml.segment_array(segmentation, segment_id, volume_node))
    score = dice(mask[index], truth[index])
    _check(score >= DICE_FLOOR, f"Dice {score:.2f} < {DICE_FLOOR} on the accepted slice")

    log("Undo restores the segment")
    controller.undo()
    _check(not mrml.segment_array(segmentation, segment_id, volume_node).any(), "undo left voxels behind")
    log("Preview for the segment → accept: the segment's state keeps the box")
    controller.request_preview(volume_node, None, None, roi, "axial", device=device, segmentation_node=segmentation,
                               segment_id=segment_id)  # as the module asks once a segment is selected
    controller.wait()
    _check(controller.preview_result is not None and list(controller.preview_result.changed) == [index],
           f"no preview on axial slice {index}: {controller.status}")
    controller.accept(segmentation, segment_id)
    seeded = mrml.segment_array(segmentation, segment_id, volume_node)
    _check(np.flatnonzero(axes.oriented(seeded).any(axis=(1, 2))).tolist() == [index],
           "the accept wrote other slices than the prompted one")
    state = controller._remembered.get((segmentation.GetID(), segment_id, axes.view))
    _check(state is not None and state.box is not None and state.box[0] == index,
           "the accepted box was not kept with the segment's state")

    log("A cancelled propagation changes nothing")
    controller.propagate(volume_node, segmentation, segment_id, direction="up", device=device)
    controller.cancel()
    controller.wait()
    _check(np.array_equal(mrml.segment_array(segmentation, segment_id, volume_node), seeded),
           "a cancelled propagation changed the segment")

    log("Propagate")
    controller.propagate(volume_node, segmentation, segment_id, "axial", index, "both", (index - 2, index + 2),
                         device=device)
    controller.wait()
    _check(controller.status.startswith("Propagated"), controller.status)
    propagated = mrml.segment_array(segmentation, segment_id, volume_node)

    log("A click in 3D → accept, then undo twice")
    oriented = axes.oriented(propagated)
    target = max((i for i in range(index - 2, index + 3) if i != index),
                 key=lambda i: int((truth[i] & ~oriented[i]).sum()))  # the slice that misses the most
    missed = truth[target] & ~oriented[target]
    _check(missed.any(), "the propagation left nothing of the hippocampus to click on")
    row, col = np.unravel_index(np.argmax(ndimage.distance_transform_edt(missed)), missed.shape)
    point = volume.to_ras(axes.pixel_to_ijk(target, [[col, row]]))[0]
    controller.click_3d(volume_node, segmentation, segment_id, point, True, device=device)
    controller.wait()
    _check(controller.refinement is not None and controller.refinement.update is not None,
           f"no 3D click result: {controller.status}")
    _check(np.array_equal(mrml.segment_array(segmentation, segment_id, volume_node), propagated),
           "a 3D click changed the segment before Accept")
    controller.accept(segmentation, segment_id)
    corrected = axes.oriented(mrml.segment_array(segmentation, segment_id, volume_node))
    _check(bool(corrected[target, row, col]), "the accepted 3D click did not add the clicked voxel")
    changed = np.flatnonzero((corrected != oriented).any(axis=(1, 2))).tolist()
    _check(target in changed and set(changed) <= set(range(index - 2, index + 3)) - {index},
           f"the 3D click changed slices {changed}")
    controller.undo()
    _check(np.array_equal(mrml.segment_array(segmentation, segment_id, volume_node), propagated),
           "undo after the 3D click did not restore the segment")
    controller.undo()
    _check(np.array_equal(mrml.segment_array(segmentation, segment_id, volume_node), seeded),
           "undo after propagation did not restore the segment")
    return {"dice": score, "seed_voxels": int(seeded.sum()), "propagated_voxels": int(propagated.sum()),
            "click_changed_slices": len(changed)}
