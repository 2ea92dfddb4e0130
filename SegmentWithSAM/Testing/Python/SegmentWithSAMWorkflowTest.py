"""In-app self-test: the whole workflow inside Slicer, on the Colin27 crop shipped with the core (no download):
box → preview → accept → undo → accept → propagate (cancelled, then completed) → undo."""

import numpy as np
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest


class SegmentWithSAMWorkflowTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_workflow()

    def test_workflow(self):
        from SegmentWithSAMSlicerLib import dependencies

        if dependencies.missing():
            self.delayDisplay("Installing dependencies")
            dependencies.install()
        from SegmentWithSAMLib.data import AAL_STRUCTURES, colin27
        from SegmentWithSAMLib.geometry import slice_axes
        from SegmentWithSAMLib.metrics import dice
        from SegmentWithSAMSlicerLib import mrml

        data = colin27()
        volumeNode = slicer.util.loadVolume(str(data.image))
        atlasNode = slicer.util.loadLabelVolume(str(data.atlas))
        controller = slicer.modules.segmentwithsam.widgetRepresentation().self().logic.controller
        volume = controller.volume(volumeNode)
        axes = slice_axes(volume, "axial")
        truth = axes.oriented(slicer.util.arrayFromVolume(atlasNode) == AAL_STRUCTURES["Hippocampus_L"])
        index = int(np.flatnonzero(truth.any(axis=(1, 2))).mean())
        rows, cols = np.nonzero(truth[index])
        corners = volume.to_ras(axes.pixel_to_ijk(index, [[cols.min(), rows.min()], [cols.max(), rows.max()]]))
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
        roi.SetCenter(*corners.mean(axis=0))
        roi.SetSize(*np.abs(corners[1] - corners[0]))

        self.delayDisplay("Preview and accept")
        controller.request_preview(volumeNode, None, None, roi, "axial")
        controller.wait()
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation.CreateDefaultDisplayNodes()
        segmentId = controller.accept(segmentation, None)
        mask = axes.oriented(mrml.segment_array(segmentation, segmentId, volumeNode))
        self.assertGreater(dice(mask[index], truth[index]), 0.5)

        self.delayDisplay("Undo restores the segment")
        controller.undo()
        self.assertFalse(mrml.segment_array(segmentation, segmentId, volumeNode).any())
        controller.request_preview(volumeNode, None, None, roi, "axial")
        controller.wait()
        controller.accept(segmentation, segmentId)
        seeded = mrml.segment_array(segmentation, segmentId, volumeNode)

        self.delayDisplay("A cancelled propagation changes nothing")
        controller.propagate(volumeNode, segmentation, segmentId, direction="up")
        controller.cancel()
        controller.wait()
        self.assertTrue(np.array_equal(mrml.segment_array(segmentation, segmentId, volumeNode), seeded))

        self.delayDisplay("Propagate, then undo")
        controller.propagate(volumeNode, segmentation, segmentId, "axial", index, "both", (index - 2, index + 2))
        controller.wait()
        self.assertTrue(controller.status.startswith("Propagated"), controller.status)
        controller.undo()
        self.assertTrue(np.array_equal(mrml.segment_array(segmentation, segmentId, volumeNode), seeded))
        self.delayDisplay("Test passed")
