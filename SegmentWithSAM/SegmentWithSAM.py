"""SegmentWithSAM: prompt-driven segmentation with Segment Anything models in 3D Slicer.

Thin by design: the widget binds the panel to a parameter node and forwards what the user does to
``SegmentWithSAMSlicerLib.logic.SegmentationController``, which turns MRML nodes into calls on the core
(``SegmentWithSAMLib``) running in a background process. Importing this module imports neither torch nor the
core's model code; dependencies are installed on first use, after asking.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from typing import Annotated

import qt
import slicer
import vtk
from slicer import (
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLMarkupsROINode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

WINDOWS = ["display", "auto", "brain", "subdural", "stroke", "bone", "soft-tissue", "lung", "abdomen", "liver"]
POLL_MS = 30


class SegmentWithSAM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Segment With SAM"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations", "Markups"]
        self.parent.contributors = ["SegmentWithSAM developers"]
        self.parent.helpText = (
            "Click positive/negative points or drag a box on any slice view: the mask appears at once. Accept "
            "writes it into the selected segment (Ctrl+Z in the Segment Editor undoes it); Propagate carries it "
            "through the volume within a range, stopping where the structure ends. The model (LiteMedSAM by "
            "default) runs in a background process, on the GPU when there is one.")
        self.parent.acknowledgementText = (
            "LiteMedSAM (MedSAM authors, Bo Wang lab) and Segment Anything (Meta AI). Test data: Colin27 and AAL.")


@parameterNodeWrapper
class SegmentWithSAMParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    segmentID: str = ""
    positivePoints: vtkMRMLMarkupsFiducialNode
    negativePoints: vtkMRMLMarkupsFiducialNode
    box: vtkMRMLMarkupsROINode
    model: Annotated[str, Choice(["litemedsam", "medsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "sam2.1_tiny",
                                  "sam2.1_small", "sam2.1_base_plus", "sam2.1_large", "medsam2"])] = "litemedsam"
    device: Annotated[str, Choice(["auto", "cpu", "cuda", "mps"])] = "auto"
    window: Annotated[str, Choice(WINDOWS)] = "display"
    livePreview: bool = True
    autoAccept3D: bool = False
    direction: Annotated[str, Choice(["both", "up", "down"])] = "both"
    rangeStart: Annotated[int, WithinRange(-1, 4096)] = -1
    rangeEnd: Annotated[int, WithinRange(-1, 4096)] = -1
    minSimilarity: Annotated[float, WithinRange(0.0, 1.0)] = 0.65
    minScore: Annotated[float, WithinRange(0.0, 1.0)] = 0.35
    maxAreaRatio: Annotated[float, WithinRange(0.0, 20.0)] = 2.5
    minOverlap: Annotated[float, WithinRange(0.0, 1.0)] = 0.2
    maxEmpty: Annotated[int, WithinRange(1, 20)] = 1
    skipSlices: Annotated[int, WithinRange(0, 4)] = 0


def pythonSlicerExecutable() -> str:
    """The interpreter for the backend process: PythonSlicer next to Slicer, else this one."""
    folders = [os.path.join(slicer.app.slicerHome, "bin"), os.path.dirname(sys.executable)]
    found = shutil.which("PythonSlicer", path=os.pathsep.join(folders))
    return found or sys.executable


class SegmentWithSAMLogic(ScriptedLoadableModuleLogic):
    """Holds the GUI-free controller (created on first use, so importing the module needs no torch)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._controller = None

    def getParameterNode(self):
        return SegmentWithSAMParameterNode(super().getParameterNode())

    @property
    def controller(self):
        if self._controller is None:
            from SegmentWithSAMLib.backend.client import BackendClient
            from SegmentWithSAMSlicerLib.logic import SegmentationController

            python = pythonSlicerExecutable()
            self._controller = SegmentationController(
                slicer.mrmlScene, lambda model, device: BackendClient(model, None if device == "auto" else device,
                                                                      python=python))
        return self._controller

    @staticmethod
    def stopRules(p: SegmentWithSAMParameterNode) -> dict:
        """The propagation stop rules from the panel: 0 switches a rule off."""
        return {"min_similarity": p.minSimilarity or None, "min_score": p.minScore or None,
                "max_area_ratio": p.maxAreaRatio or None, "min_overlap": p.minOverlap or None,
                "max_empty": p.maxEmpty}

    @staticmethod
    def sliceRange(p: SegmentWithSAMParameterNode, numSlices: int) -> tuple[int, int]:
        return (0 if p.rangeStart < 0 else p.rangeStart, numSlices - 1 if p.rangeEnd < 0 else p.rangeEnd)

    def close(self) -> None:
        if self._controller is not None:
            self._controller.close()
            self._controller = None


class SegmentWithSAMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.promptWatcher = None
        self.sentClicks = set()  # (node ID, control point ID) of the points already sent as clicks in 3D
        self.timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SegmentWithSAM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SegmentWithSAMLogic()
        from SegmentWithSAMSlicerLib.prompt_watch import PromptWatcher

        self.promptWatcher = PromptWatcher(self.onPromptsChanged)  # previews only when placed prompts change
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.onPoll)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.ui.segmentSelector.setCurrentNode)
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self.onSegmentChanged)
        for button, slot in ((self.ui.previewButton, self.requestPreview), (self.ui.acceptButton, self.onAccept),
                             (self.ui.clearButton, self.onClear), (self.ui.undoButton, self.onUndo),
                             (self.ui.propagateButton, self.onPropagate), (self.ui.cancelButton, self.onCancel)):
            button.connect("clicked(bool)", lambda _checked, s=slot: self.run(s))
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self.promptWatcher is not None:
            self.promptWatcher.close()
        if self.timer is not None:
            self.timer.stop()
        if self.logic is not None:
            self.logic.close()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode and self._parameterNodeGuiTag:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.close()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        p = self.logic.getParameterNode()
        if not p.inputVolume:
            p.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        fiducial, roi = "vtkMRMLMarkupsFiducialNode", "vtkMRMLMarkupsROINode"
        for name, cls, label, color in (("positivePoints", fiducial, "SAM positive", (0.2, 0.9, 0.2)),
                                        ("negativePoints", fiducial, "SAM negative", (0.95, 0.2, 0.2)),
                                        ("box", roi, "SAM box", (1.0, 0.85, 0.1))):
            if not getattr(p, name):
                node = slicer.mrmlScene.AddNewNodeByClass(cls, label)
                node.CreateDefaultDisplayNodes()
                node.GetDisplayNode().SetSelectedColor(*color)
                setattr(p, name, node)
        self.setParameterNode(p)

    def setParameterNode(self, p) -> None:
        if self._parameterNode and self._parameterNodeGuiTag:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = p
        if p is None:
            self.promptWatcher.close()
            return
        self._parameterNodeGuiTag = p.connectGui(self.ui)
        self.ui.segmentSelector.setCurrentNode(p.segmentation)
        self.ui.segmentSelector.setCurrentSegmentID(p.segmentID)
        for widget, node in ((self.ui.positivePlaceWidget, p.positivePoints),
                             (self.ui.negativePlaceWidget, p.negativePoints), (self.ui.roiPlaceWidget, p.box)):
            widget.setCurrentNode(node)
        self.promptWatcher.watch([p.positivePoints, p.negativePoints, p.box])
        self.ui.positivePlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        self.ui.negativePlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups

    # ---- actions -------------------------------------------------------------------------------------------
    def run(self, action, ask: bool = True) -> None:
        """Run a user action; user errors go to the status line, nothing else changes. ``ask``: offer to
        install missing dependencies (buttons do; live preview only reports)."""
        try:
            if not self.ensureDependencies(ask):
                return
            from SegmentWithSAMLib.errors import SegmentWithSAMError
        except ImportError as error:
            self.setStatus(f"SegmentWithSAM is not fully installed: {error}", error=True)
            return
        try:
            action()
        except SegmentWithSAMError as error:
            self.setStatus(str(error), error=True)
        self.timer.start()

    def ensureDependencies(self, ask: bool = True) -> bool:
        """Install what is missing after asking (on the main thread, with a wait cursor)."""
        from SegmentWithSAMSlicerLib import dependencies

        needed = dependencies.missing()
        if not needed:
            return True
        if not ask:
            self.setStatus("Click Preview to install the packages SegmentWithSAM needs.", error=True)
            return False
        if not slicer.util.confirmOkCancelDisplay(
                "SegmentWithSAM needs these Python packages: " + ", ".join(needed)
                + ".\nInstall them now? This downloads several hundred MB and can take a few minutes."):
            self.setStatus("Dependencies not installed: the model cannot run.", error=True)
            return False
        try:
            with slicer.util.WaitCursor():
                dependencies.install(report=lambda message: self.setStatus(message))
        except dependencies.InstallError as error:  # pip's CalledProcessError arrives as this (dependencies.py)
            self.setStatus(str(error), error=True)
            return False
        return True

    def promptView(self, p):
        """The view the prompts were placed in (the slice view whose plane holds them)."""
        from SegmentWithSAMSlicerLib import mrml

        volume = self.logic.controller.volume(p.inputVolume)
        points, _ = mrml.ordered_clicks(p.positivePoints, p.negativePoints)
        placed = mrml.roi_corners(p.box)
        anchors = points if placed is None else [*points, placed[1]]
        layout = slicer.app.layoutManager()
        sliceNodes = [layout.sliceWidget(name).mrmlSliceNode() for name in layout.sliceViewNames()]
        return mrml.view_of_prompts(anchors, sliceNodes, volume)[1] if len(anchors) else "axial"

    def ensureModel(self, ask: bool = True) -> bool:
        """Offer to download the chosen model if it is not installed yet (the download runs in the background,
        with progress in the status line)."""
        controller = self.logic.controller
        entry = controller.missing_model(self._parameterNode.model)
        if entry is None:
            return True
        if controller.download is not None:
            return False
        if ask and slicer.util.confirmOkCancelDisplay(
                f"{entry.name} is not downloaded yet ({entry.size / 1e6:.0f} MB, licence {entry.licence}).\n"
                f"Download it now from {entry.url}? Its SHA-256 is checked before use."):
            controller.start_download(entry)
        else:
            self.setStatus(f"{entry.name} is not downloaded yet: click Preview to download it.", error=True)
        return False

    def requestPreview(self, ask: bool = True) -> None:
        p = self._parameterNode
        if not self.ensureModel(ask):
            return
        self.logic.controller.request_preview(p.inputVolume, p.positivePoints, p.negativePoints, p.box,
                                              self.promptView(p), self.logic.controller.window(p.inputVolume, p.window),
                                              p.model, p.device, p.segmentation, p.segmentID)
        self.setStatus("Segmenting…")

    def onPromptsChanged(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if not p or not p.inputVolume:
            return
        from SegmentWithSAMSlicerLib import mrml

        if mrml.roi_corners(p.box) is None and self.segmentHasMask():  # a box always gives a 2D preview
            self.run(self.sendClicks3D, ask=False)
        elif p.livePreview:
            self.run(lambda: self.requestPreview(ask=False), ask=False)

    def segmentHasMask(self) -> bool:
        """Whether points should correct the selected segment in 3D: it has voxels (after Accept or Propagate)."""
        from SegmentWithSAMSlicerLib import mrml

        p = self._parameterNode
        return mrml.segment_has_mask(p.segmentation, p.segmentID, p.inputVolume)

    def sendClicks3D(self) -> None:
        """Send each point placed since the last as a click in 3D on the selected segment, in click order."""
        from SegmentWithSAMSlicerLib import mrml

        p = self._parameterNode
        editor = self.segmentEditor()
        controller = self.logic.controller
        for position, positive in mrml.new_clicks(p.positivePoints, p.negativePoints, self.sentClicks):
            controller.click_3d(p.inputVolume, p.segmentation, p.segmentID, position, positive,
                                window=controller.window(p.inputVolume, p.window),
                                model=p.model, device=p.device, editor_node=editor and editor.mrmlSegmentEditorNode(),
                                save_state=editor and editor.saveStateForUndo, auto_accept=p.autoAccept3D)

    def segmentEditor(self):
        """The Segment Editor widget's editor, pointed at our segmentation, so Ctrl+Z there undoes our edits."""
        try:
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        except AttributeError:
            return None
        editor.setSegmentationNode(self._parameterNode.segmentation)
        editor.setSourceVolumeNode(self._parameterNode.inputVolume)
        return editor

    def onAccept(self) -> None:
        p = self._parameterNode
        if not p.segmentation:
            p.segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
            p.segmentation.CreateDefaultDisplayNodes()
            p.segmentation.SetReferenceImageGeometryParameterFromVolumeNode(p.inputVolume)
        editor = self.segmentEditor()
        p.segmentID = self.logic.controller.accept(p.segmentation, p.segmentID,
                                                   editor and editor.mrmlSegmentEditorNode(),
                                                   editor and editor.saveStateForUndo)
        self.ui.segmentSelector.setCurrentSegmentID(p.segmentID)
        self.onClear()

    def onClear(self) -> None:
        p = self._parameterNode
        with self.promptWatcher.paused():  # one step: no preview of the prompts left while removing node by node
            for node in (p.positivePoints, p.negativePoints, p.box):
                node.RemoveAllControlPoints()
        self.sentClicks.clear()
        self.logic.controller.discard_refinement()
        self.logic.controller.clear_preview()

    def onUndo(self) -> None:
        editor = self.segmentEditor()
        editor.undo() if editor is not None else self.logic.controller.undo()

    def onPropagate(self) -> None:
        from SegmentWithSAMLib.geometry import slice_axes

        p = self._parameterNode
        controller = self.logic.controller
        if not self.ensureModel():
            return
        last = controller.last_accepted
        view = last[2] if last else self.promptView(p)
        numSlices = slice_axes(controller.volume(p.inputVolume), view).num_slices
        editor = self.segmentEditor()
        panelRange = None if p.rangeStart < 0 and p.rangeEnd < 0 else self.logic.sliceRange(p, numSlices)
        controller.propagate(p.inputVolume, p.segmentation, p.segmentID, None, None, p.direction,
                             panelRange, self.logic.stopRules(p),
                             controller.window(p.inputVolume, p.window), p.model, p.device,
                             editor and editor.mrmlSegmentEditorNode(), editor and editor.saveStateForUndo,
                             p.skipSlices)
        self.ui.cancelButton.enabled = True

    def onCancel(self) -> None:
        self.logic.controller.cancel()

    def onSegmentChanged(self, segmentID) -> None:
        if self._parameterNode:
            self._parameterNode.segmentID = segmentID or ""

    def onPoll(self) -> None:
        controller = self.logic.controller
        busy = controller.poll()
        self.setStatus(controller.status, error="failed" in controller.status or "not applied" in controller.status)
        progress = controller.progress
        self.ui.progressBar.visible = progress is not None
        if progress:
            self.ui.progressBar.maximum, self.ui.progressBar.value = max(progress[1], 1), progress[0]
        self.ui.cancelButton.enabled = controller.propagation is not None
        self.ui.propagateButton.enabled = controller.propagation is None
        if not busy:
            self.timer.stop()

    def setStatus(self, text: str, error: bool = False) -> None:
        self.ui.statusLabel.text = text
        self.ui.statusLabel.setStyleSheet("color: #c62828" if error else "")
        if error:
            logging.warning(text)


class SegmentWithSAMTest(ScriptedLoadableModuleTest):
    """The panel and parameter node, then the whole workflow (SegmentWithSAMSlicerLib/selftest.py, which the
    pytest suite also runs against slicer-core)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_panel_and_parameters()
        self.test_workflow()

    def test_panel_and_parameters(self):
        self.delayDisplay("Panel and parameter node (no torch needed)")
        widget = slicer.modules.segmentwithsam.widgetRepresentation().self()
        p = widget.logic.getParameterNode()
        p.minScore, p.maxEmpty = 0.0, 3
        rules = SegmentWithSAMLogic.stopRules(p)
        self.assertIsNone(rules["min_score"])
        self.assertEqual(rules["max_empty"], 3)
        self.assertEqual(SegmentWithSAMLogic.sliceRange(p, 100), (0, 99))
        self.assertTrue(p.positivePoints and p.negativePoints and p.box)
        self.assertIsInstance(p.positivePoints.GetDisplayNode(), vtk.vtkObject)

    def test_workflow(self):
        from SegmentWithSAMSlicerLib import dependencies

        if dependencies.missing():  # a test never installs: the test environment must bring the packages
            self.delayDisplay("Workflow skipped, packages missing: " + ", ".join(dependencies.missing()))
            return
        from SegmentWithSAMSlicerLib.selftest import run_workflow

        controller = slicer.modules.segmentwithsam.widgetRepresentation().self().logic.controller
        measured = run_workflow(slicer.mrmlScene, controller, self.delayDisplay)
        self.delayDisplay(f"Test passed: {measured}")
