"""SegmentWithSAM: prompt-driven segmentation with Segment Anything models in 3D Slicer.

Widgets and wiring only: the panel is bound to a parameter node made of the shared settings
(``SegmentWithSAMSlicerLib.settings``) and the selected nodes, and every button and prompt goes to
``SegmentWithSAMSlicerLib.front_end.FrontEnd``, the rules the web app follows too, over the controller that
turns MRML nodes into steps of the core (``SegmentWithSAMLib``) in a background process. The widget is the
front end's host: it says which nodes are selected, which slice views there are and which Segment Editor a
write goes through. Importing this module imports neither torch nor the core's model code; dependencies are
installed on first use, after asking.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import sys
import traceback
from typing import Annotated

import qt
import slicer
import vtk
from slicer import (
    vtkMRMLMarkupsClosedCurveNode,
    vtkMRMLMarkupsCurveNode,
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

POLL_MS = 30
# the front end's prompt kinds (front_end.PROMPTS) → the parameter node's fields that hold their nodes
PROMPT_PARAMETERS = {"positive": "positivePoints", "negative": "negativePoints", "box": "box", "scribble": "scribble",
                     "negative_scribble": "negativeScribble", "lasso": "lasso", "negative_lasso": "negativeLasso"}


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


@functools.cache
def parameterNodeClass():
    """The parameter node: the selected nodes, then every field of the shared ``Settings`` with the choices or
    range its metadata gives (made on first use: the model choices come from the registry)."""
    from SegmentWithSAMSlicerLib.settings import Settings

    annotations = {"inputVolume": vtkMRMLScalarVolumeNode, "segmentation": vtkMRMLSegmentationNode, "segmentID": str,
                   "positivePoints": vtkMRMLMarkupsFiducialNode, "negativePoints": vtkMRMLMarkupsFiducialNode,
                   "box": vtkMRMLMarkupsROINode, "scribble": vtkMRMLMarkupsCurveNode,
                   "negativeScribble": vtkMRMLMarkupsCurveNode, "lasso": vtkMRMLMarkupsClosedCurveNode,
                   "negativeLasso": vtkMRMLMarkupsClosedCurveNode}
    defaults = {"segmentID": ""}
    kinds = {"str": str, "bool": bool, "int": int, "float": float}
    for field in dataclasses.fields(Settings):
        kind = kinds[field.type]
        if "choices" in field.metadata:
            kind = Annotated[kind, Choice(field.metadata["choices"]())]
        elif "range" in field.metadata:
            kind = Annotated[kind, WithinRange(*field.metadata["range"])]
        annotations[field.name], defaults[field.name] = kind, field.default
    return parameterNodeWrapper(type("SegmentWithSAMParameterNode", (), {"__annotations__": annotations, **defaults}))


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
        return parameterNodeClass()(super().getParameterNode())

    @property
    def controller(self):
        if self._controller is None:
            from SegmentWithSAMLib.backend.client import BackendClient
            from SegmentWithSAMSlicerLib.logic import SegmentationController

            python = pythonSlicerExecutable()
            self._controller = SegmentationController(
                slicer.mrmlScene, lambda model, device: BackendClient(model, device, python=python))
        return self._controller

    def close(self) -> None:
        if self._controller is not None:
            self._controller.close()
            self._controller = None


class SegmentWithSAMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel; also the front end's host (the selected nodes, the slice views, the Segment Editor)."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.frontEnd = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.promptWatcher = None
        self.timer = None
        self._installing = False  # pip runs on this thread and processes events: no action starts meanwhile
        self._installed: set[tuple[str, str]] = set()  # (model, device) whose packages were all found

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SegmentWithSAM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SegmentWithSAMLogic()
        from SegmentWithSAMSlicerLib.backend_choice import key_from_environment
        from SegmentWithSAMSlicerLib.prompt_watch import PromptWatcher

        self.ui.serverKeyLineEdit.text = key_from_environment()  # the key lives in this widget, never in the scene
        self.promptWatcher = PromptWatcher(self.onPromptsChanged)  # previews only when placed prompts change
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.onPoll)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        # importing a scene copies its saved parameter node into ours (vtkMRMLScene::Import, singletons), so the
        # widgets follow the imported prompt nodes (as Modules/Scripted/SegmentEditor/SegmentEditor.py does)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.ui.segmentSelector.setCurrentNode)
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self.onSegmentChanged)
        for widget in (self.ui.scribblePlaceWidget, self.ui.negativeScribblePlaceWidget, self.ui.lassoPlaceWidget,
                       self.ui.negativeLassoPlaceWidget):  # a stroke is sent when the user stops placing it
            widget.connect("activeMarkupsPlaceModeChanged(bool)", self.onStrokePlaceModeChanged)
        self.ui.finishedCheckBox.connect("clicked(bool)",  # the user's clicks only: a poll sets it from the segment
                                         lambda checked: self.run(lambda: self.front().set_finished(checked),
                                                                  needs_model=False))
        # the server's fields follow the backend chosen at the next poll
        self.ui.backendComboBox.connect("currentIndexChanged(int)", lambda _index: self.timer.start())
        for button, slot in ((self.ui.previewButton, self.onPreview), (self.ui.acceptButton, self.onAccept),
                             (self.ui.propagateButton, self.onPropagate), (self.ui.suggestButton, self.onSuggest)):
            button.connect("clicked(bool)", lambda _checked, s=slot: self.run(s))
        for button, slot in ((self.ui.clearButton, self.onClear), (self.ui.undoButton, self.onUndo),
                             (self.ui.cancelButton, self.onCancel),
                             (self.ui.testConnectionButton, self.onTestConnection),
                             (self.ui.takeSuggestionButton, self.onTakeSuggestion)):  # no model needed: no install
            button.connect("clicked(bool)", lambda _checked, s=slot: self.run(s, needs_model=False))
        self.initializeParameterNode()

    def cleanup(self) -> None:
        # Reload (slicer.util.reloadScriptedModule) only hides this panel's widgets: they go on emitting, so with no
        # parameter node and no front end their handlers do nothing (and the prompt watcher is closed)
        self.setParameterNode(None)
        self.frontEnd = None
        self.removeObservers()
        if self.timer is not None:
            self.timer.stop()
        if self.logic is not None:
            self.logic.close()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self._disconnectGui()

    def _disconnectGui(self) -> None:
        # a wrapper's first tag is 0 (parameterNodeWrapper/wrapper.py: _nextParameterGUIsTag = 0), so test for None
        if self._parameterNode is not None and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.timer.stop()
        self.logic.close()
        self.frontEnd = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        from SegmentWithSAMSlicerLib.settings import Settings

        p = self.logic.getParameterNode()
        if not p.inputVolume:  # the first scalar volume that is not a labelmap (the selector shows no labelmaps)
            p.inputVolume = next((node for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                                  if not node.IsA("vtkMRMLLabelMapVolumeNode")), None)
        for field in dataclasses.fields(Settings):  # a saved choice this version no longer offers: its default
            if "choices" in field.metadata and getattr(p, field.name) not in field.metadata["choices"]():
                setattr(p, field.name, field.default)
        missing = [kind for kind, name in PROMPT_PARAMETERS.items() if not getattr(p, name)]
        if missing:  # only those: a prompt node the user deleted is made again, the others stay as they are
            from SegmentWithSAMSlicerLib.front_end import add_prompt_nodes

            for kind, node in add_prompt_nodes(slicer.mrmlScene, missing).items():
                setattr(p, PROMPT_PARAMETERS[kind], node)
        self.setParameterNode(p)

    def setParameterNode(self, p) -> None:
        self._disconnectGui()
        self._parameterNode = p
        if p is None:
            if self.promptWatcher is not None:
                self.promptWatcher.close()
            return
        # connecting the segmentation may select its first segment (qMRMLSegmentSelectorWidget::
        # populateSegmentCombobox) and onSegmentChanged would write that here: the saved choice is read first
        segment_id = p.segmentID
        self._parameterNodeGuiTag = p.connectGui(self.ui)
        from SegmentWithSAMSlicerLib.settings import choice_labels

        for index, label in enumerate(choice_labels("backend")):  # connectGui shows the values; read by index
            self.ui.backendComboBox.setItemText(index, label)
        self.ui.segmentSelector.setCurrentNode(p.segmentation)
        self.ui.segmentSelector.setCurrentSegmentID(segment_id)
        for widget, node in ((self.ui.positivePlaceWidget, p.positivePoints),
                             (self.ui.negativePlaceWidget, p.negativePoints), (self.ui.roiPlaceWidget, p.box),
                             (self.ui.scribblePlaceWidget, p.scribble),
                             (self.ui.negativeScribblePlaceWidget, p.negativeScribble),
                             (self.ui.lassoPlaceWidget, p.lasso), (self.ui.negativeLassoPlaceWidget, p.negativeLasso)):
            widget.setCurrentNode(node)
        self.promptWatcher.watch([p.positivePoints, p.negativePoints, p.box])
        self.ui.positivePlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        self.ui.negativePlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        # the interaction node's persistence is one for all place widgets (qSlicerMarkupsPlaceWidget::
        # setPlaceModeEnabled): the box's own placement ends after it, or its next click makes a new ROI node
        self.ui.roiPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup
        self.timer.start()  # the panel follows the parameter node's backend at the next poll

    # ---- the front end's host ------------------------------------------------------------------------------
    @property
    def volume_node(self):
        return self._parameterNode.inputVolume

    @property
    def segmentation_node(self):
        return self._parameterNode.segmentation

    @segmentation_node.setter
    def segmentation_node(self, node) -> None:
        self._parameterNode.segmentation = node

    @property
    def segment_id(self) -> str:
        return self._parameterNode.segmentID

    @property
    def prompts(self) -> dict:
        return {kind: getattr(self._parameterNode, name) for kind, name in PROMPT_PARAMETERS.items()}

    def slice_nodes(self) -> list:
        layout = slicer.app.layoutManager()
        if layout is None:  # no main window
            return []
        widgets = (layout.sliceWidget(name) for name in layout.sliceViewNames())
        return [widget.mrmlSliceNode() for widget in widgets if widget]

    def segmentEditor(self):
        """The Segment Editor widget, with a segment editor node, pointed at our nodes (None without the module or
        without a segmentation: pointing it at none would clear the user's selection and active effect)."""
        from SegmentWithSAMSlicerLib.segment_editor import point_segment_editor

        if self.segmentation_node is None:
            return None
        try:
            module = slicer.modules.segmenteditor.widgetRepresentation().self()
        except AttributeError:
            return None
        return point_segment_editor(module, self.segmentation_node, self.volume_node)

    def edit_target(self):
        editor = self.segmentEditor()
        return (editor.mrmlSegmentEditorNode(), editor.saveStateForUndo) if editor is not None else (None, None)

    # ---- actions -------------------------------------------------------------------------------------------
    def run(self, action, ask: bool = True, needs_model: bool = True) -> None:
        """Run a user action through the front end (its error stays in the status line until the next action).
        ``ask``: offer to install missing dependencies (buttons do; live preview only reports); ``needs_model``
        False: the action runs without them (clearing, undoing, cancelling, a setting). The front end
        turns the errors a user can act on into the status line; anything else is shown in a dialog, and the
        panel goes on polling (``tryWithErrorDisplay`` shows it, then raises it again: slicer/util.py)."""
        if self._installing or self._parameterNode is None:
            return
        try:
            with slicer.util.tryWithErrorDisplay("SegmentWithSAM failed unexpectedly.", waitCursor=False):
                if not needs_model or self.ensureDependencies(ask):
                    self.front().act(action)
        except Exception:
            logging.exception("SegmentWithSAM action failed")
        self.showStatus()
        self.timer.start()

    def front(self):
        if self.frontEnd is None:
            from SegmentWithSAMSlicerLib.front_end import FrontEnd

            self.frontEnd = FrontEnd(self.logic.controller, self._parameterNode, self)
        self.frontEnd.settings = self._parameterNode
        self.frontEnd.controller.backend.key = self.ui.serverKeyLineEdit.text
        return self.frontEnd

    def ensureDependencies(self, ask: bool = True) -> bool:
        """Install what the chosen model and device need after asking (on the main thread, with a wait cursor):
        LiteMedSAM on the CPU needs no PyTorch (``dependencies.plan``)."""
        from SegmentWithSAMSlicerLib import dependencies
        from SegmentWithSAMSlicerLib.settings import runs_here

        p = self._parameterNode
        if (p.model, p.device) in self._installed or not runs_here(p):
            return True
        needed = dependencies.missing(p.model, p.device)  # reads package metadata: once per model and device
        if not needed:
            self._installed.add((p.model, p.device))
            return True
        if not ask:
            self.showStatus(f"Click Preview to install the packages {p.model} needs.", error=True)
            return False
        size = ("PyTorch comes through the PyTorch extension, with the build for this computer's GPU (gigabytes)"
                if "torch" in needed else "This downloads about 250 MB")
        if not slicer.util.confirmOkCancelDisplay(
                f"{p.model} on {p.device} needs these Python packages: " + ", ".join(needed)
                + f".\nInstall them now? {size} and can take a few minutes."):
            self.showStatus("Dependencies not installed: the model cannot run.", error=True)
            return False
        self._installing = True
        try:
            with slicer.util.WaitCursor():
                dependencies.install(p.model, p.device, report=lambda message: self.showStatus(message))
        except dependencies.InstallError as error:  # pip's CalledProcessError arrives as this (dependencies.py)
            self.showStatus(str(error), error=True)
            return False
        finally:
            self._installing = False
        return True

    def offerDownload(self) -> None:
        """Ask to download the chosen model if it is not installed (the download runs in the background)."""
        controller = self.logic.controller
        entry = self.front().model_to_download()
        if entry is not None and controller.download is None and slicer.util.confirmOkCancelDisplay(
                f"{entry.name} is not downloaded yet ({entry.size / 1e6:.0f} MB, licence {entry.licence}).\n"
                f"Download it now from {entry.url}? It is kept only if its SHA-256 is the expected one."):
            controller.start_download(entry)

    def onPreview(self) -> None:
        self.offerDownload()
        self.front().preview()

    def onPromptsChanged(self, caller=None, event=None) -> None:
        # called from inside the markups widget's event handling (PlacePoint, a drag): act once it has returned
        qt.QTimer.singleShot(0, self.previewChangedPrompts)

    def previewChangedPrompts(self) -> None:
        if self._parameterNode and self._parameterNode.inputVolume:
            self.run(lambda: self.front().prompts_changed(), ask=False)

    def onAccept(self) -> None:
        p = self._parameterNode
        with self.promptWatcher.paused():  # one step: no preview of the prompts left while removing node by node
            p.segmentID = self.front().accept()
        self.ui.segmentSelector.setCurrentSegmentID(p.segmentID)

    def onClear(self) -> None:
        with self.promptWatcher.paused():
            self.front().clear_prompts()

    def onUndo(self) -> None:
        editor = self.segmentEditor()
        editor.undo() if editor is not None else self.logic.controller.undo()

    def onPropagate(self) -> None:
        self.offerDownload()
        self.front().propagate()

    def onCancel(self) -> None:
        self.front().cancel()

    def onTestConnection(self) -> None:
        self.front().test_connection()

    def onStrokePlaceModeChanged(self, placing: bool) -> None:
        # emitted inside vtkSlicerMarkupsWidget::ProcessInteractionEvent with rendering paused: the stroke's
        # node is emptied and a dialog may open only after it returns
        if not placing:
            qt.QTimer.singleShot(0, self.onStrokePlaced)

    def onStrokePlaced(self) -> None:
        # place mode also ends with nothing drawn (the button toggled off, the scene closing): nothing to send
        if self._parameterNode and self._parameterNode.inputVolume and self.front().drawn_strokes():
            self.run(self.sendStrokes)

    def sendStrokes(self) -> None:
        segment_id = self.front().send_strokes()
        if segment_id:
            self._parameterNode.segmentID = segment_id
            self.ui.segmentSelector.setCurrentSegmentID(segment_id)

    def onSuggest(self) -> None:
        self.front().suggest()

    def onTakeSuggestion(self) -> None:
        self.front().take_suggestion()

    def onSegmentChanged(self, segmentID) -> None:
        if self._parameterNode:
            self._parameterNode.segmentID = segmentID or ""
            if self.frontEnd is not None:
                self.timer.start()  # the buttons follow the selected segment at the next poll

    def onPoll(self) -> None:
        """The background work's progress into the panel; stops when nothing runs, or on an unexpected error,
        before showing it: Qt goes on delivering the timer's events inside a modal dialog (slicer.util.errorDisplay
        runs the message box's exec_), so a dialog shown while polling would open another every POLL_MS."""
        if self._parameterNode is None or self._installing:
            self.timer.stop()
            return
        try:
            busy = self.updatePanel()
        except Exception as error:
            self.timer.stop()
            logging.exception("SegmentWithSAM could not update its panel")
            slicer.util.errorDisplay(f"SegmentWithSAM failed unexpectedly: {error}",
                                     detailedText=traceback.format_exc())
            return
        if not busy:
            self.timer.stop()

    def updatePanel(self) -> bool:
        """Poll the front end and show its panel; True while background work runs."""
        busy = self.front().poll()
        self.showStatus()
        panel = self.front().panel()
        self.ui.progressBar.visible = panel["progress"] is not None
        if panel["progress"]:
            self.ui.progressBar.maximum, self.ui.progressBar.value = max(panel["progress"][1], 1), panel["progress"][0]
        self.ui.acceptButton.enabled = panel["can_accept"]
        self.ui.cancelButton.enabled = panel["propagating"]
        self.ui.propagateButton.enabled = panel["can_propagate"]
        for widget in (self.ui.serverAddressLineEdit, self.ui.serverKeyLineEdit, self.ui.serverCafileLineEdit):
            widget.enabled = panel["server"]
        self.ui.modelComboBox.enabled = self.ui.deviceComboBox.enabled = not panel["server"]  # the server's own
        self.ui.testConnectionButton.enabled = panel["can_test_connection"]
        self.ui.suggestionLabel.text = panel["suggestion"]
        self.ui.finishedCheckBox.enabled = panel["can_finish"]
        self.ui.finishedCheckBox.checked = panel["finished"]
        self.ui.takeSuggestionButton.enabled = panel["can_take_suggestion"]
        return busy

    def showStatus(self, text: str | None = None, error: bool = False) -> None:
        """The front end's status line (or ``text``, said through it)."""
        if self.frontEnd is None:  # before the first action (the packages may not be installed yet)
            text, error = text or "", error
        else:
            if text is not None:
                self.frontEnd.say(text, error)
            text, error = self.frontEnd.status.text, self.frontEnd.status.error
        self.ui.statusLabel.text = text
        self.ui.statusLabel.setStyleSheet("color: #c62828" if error else "")


class SegmentWithSAMTest(ScriptedLoadableModuleTest):
    """The panel driven through its widgets (prompts through the markups nodes, the buttons clicked, the status
    label read), then the whole workflow on the controller (SegmentWithSAMSlicerLib/selftest.py, which the pytest
    suite also runs against slicer-core)."""

    # The workflows' device: the one whose packages they check ("auto" would take a GPU, which needs PyTorch's)
    DEVICE = "cpu"

    def setUp(self):
        slicer.mrmlScene.Clear()

    def skipped(self, what: str) -> bool:
        """Whether ``what`` is skipped (said on screen) for want of LiteMedSAM's packages on DEVICE: a test never
        installs, the environment brings them."""
        from SegmentWithSAMSlicerLib import dependencies

        missing = dependencies.missing("litemedsam", self.DEVICE)
        if missing:
            self.delayDisplay(f"{what} skipped, packages missing: " + ", ".join(missing))
        return bool(missing)

    def runTest(self):
        for test in (self.test_panel_and_parameters, self.test_panel_workflow, self.test_workflow):
            self.setUp()  # each test on a cleared scene, as ScriptedLoadableModuleTest.runTest does
            test()

    def widget(self):
        slicer.util.selectModule("SegmentWithSAM")
        return slicer.modules.segmentwithsam.widgetRepresentation().self()

    def waitForPanel(self, widget, timeout: float = 300.0) -> str:
        """Process events until the panel's poll timer stops; returns the status label's text."""
        import time

        end = time.monotonic() + timeout
        while widget.timer.isActive() and time.monotonic() < end:
            slicer.app.processEvents()
            time.sleep(0.02)
        return widget.ui.statusLabel.text

    def test_panel_and_parameters(self):
        self.delayDisplay("Panel and parameter node (no torch needed)")
        from SegmentWithSAMSlicerLib.settings import choice_labels, model_choices, stop_rules

        widget = self.widget()
        p = widget.logic.getParameterNode()
        self.assertEqual([widget.ui.modelComboBox.itemText(i) for i in range(widget.ui.modelComboBox.count)],
                         model_choices())
        backends = widget.ui.backendComboBox
        self.assertEqual([backends.itemText(i) for i in range(backends.count)], choice_labels("backend"))
        backends.currentIndex = 1
        self.assertEqual(p.backend, "server")  # the labels are shown, the values stored
        p.backend = "local"
        p.min_score, p.max_empty = 0.0, 3
        rules = stop_rules(p)
        self.assertIsNone(rules["min_score"])
        self.assertEqual(rules["max_empty"], 3)
        self.assertTrue(p.positivePoints and p.negativePoints and p.box)
        self.assertIsInstance(p.positivePoints.GetDisplayNode(), vtk.vtkObject)
        p.inputVolume, p.range_start = None, 5  # a range and no volume yet: the poll shows no range, and stops
        widget.timer.start()
        widget.onPoll()
        self.assertFalse(widget.timer.isActive())
        p.range_start = -1
        widget.exit()  # the GUI connection (tag 0 on a new wrapper) is removed, and made again on entering
        self.assertIsNone(widget._parameterNodeGuiTag)
        widget.enter()
        self.assertIsNotNone(widget._parameterNodeGuiTag)

    def test_panel_workflow(self):
        """A point off every slice plane: the error stays in the status label past the poll; a box on the
        hippocampus: Preview, Accept (a segment with voxels), Ctrl+Z through Undo."""
        if self.skipped("Panel workflow"):
            return
        from SegmentWithSAMLib.data import colin27

        volume = slicer.util.loadVolume(str(colin27().image))
        widget = self.widget()
        p = widget._parameterNode
        p.inputVolume, p.live_preview = volume, False
        p.device = self.DEVICE
        p.positivePoints.AddControlPoint(1e4, 1e4, 1e4)  # on no slice view's plane
        widget.ui.previewButton.click()
        self.assertIn("do not lie on the plane", self.waitForPanel(widget))
        self.assertIn("c62828", widget.ui.statusLabel.styleSheet)  # shown as an error, still after the poll
        widget.ui.clearButton.click()
        bounds = [0.0] * 6
        volume.GetRASBounds(bounds)
        middle = [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2]
        red = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
        red.JumpSliceByCentering(*middle)
        p.box.SetCenter(middle[0], middle[1], red.GetSliceToRAS().GetElement(2, 3))
        p.box.SetSize(40, 40, 0)
        widget.ui.previewButton.click()
        self.assertIn("Preview", self.waitForPanel(widget))
        widget.ui.acceptButton.click()
        segment = p.segmentID
        self.assertTrue(slicer.util.arrayFromSegmentBinaryLabelmap(p.segmentation, segment, volume).any())
        widget.ui.undoButton.click()
        self.assertFalse(slicer.util.arrayFromSegmentBinaryLabelmap(p.segmentation, segment, volume).any())

    def test_workflow(self):
        if self.skipped("Workflow"):
            return
        from SegmentWithSAMSlicerLib.selftest import run_workflow

        controller = slicer.modules.segmentwithsam.widgetRepresentation().self().logic.controller
        measured = run_workflow(slicer.mrmlScene, controller, self.delayDisplay, device=self.DEVICE)
        self.delayDisplay(f"Test passed: {measured}")
