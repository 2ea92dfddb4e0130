"""The module's workflow as a self-test, run inside Slicer (``SegmentWithSAMTest``, CTest) and by pytest
against ``slicer-core``: box → preview → accept → undo → accept → cancelled propagation → propagation → undo,
on Colin27 (the crop shipped with the core when Debian's copy is absent; nothing is downloaded)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import slicer

from SegmentWithSAMLib.data import AAL_STRUCTURES, colin27
from SegmentWithSAMLib.geometry import slice_axes
from SegmentWithSAMLib.metrics import dice

from . import mrml

DICE_FLOOR = 0.5  # the accepted slice vs AAL (0.59 measured with a tight box on the middle axial slice)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def run_workflow(scene, controller, log: Callable[[str], None] = print) -> dict:
    """Run the workflow with ``controller`` (a :class:`~.logic.SegmentationController`) on ``scene``; raises
    AssertionError at the first step that does not do what it should. Returns what it measured."""
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
    controller.request_preview(volume_node, None, None, roi, "axial")
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
    controller.request_preview(volume_node, None, None, roi, "axial")
    controller.wait()
    controller.accept(segmentation, segment_id)
    seeded = mrml.segment_array(segmentation, segment_id, volume_node)

    log("A cancelled propagation changes nothing")
    controller.propagate(volume_node, segmentation, segment_id, direction="up")
    controller.cancel()
    controller.wait()
    _check(np.array_equal(mrml.segment_array(segmentation, segment_id, volume_node), seeded),
           "a cancelled propagation changed the segment")

    log("Propagate, then undo")
    controller.propagate(volume_node, segmentation, segment_id, "axial", index, "both", (index - 2, index + 2))
    controller.wait()
    _check(controller.status.startswith("Propagated"), controller.status)
    propagated = int(mrml.segment_array(segmentation, segment_id, volume_node).sum())
    controller.undo()
    _check(np.array_equal(mrml.segment_array(segmentation, segment_id, volume_node), seeded),
           "undo after propagation did not restore the segment")
    return {"dice": score, "seed_voxels": int(seeded.sum()), "propagated_voxels": propagated}
