"""What the SegmentWithSAM module does, without Qt: live previews from markups prompts, accept into a segment
as one undoable Segment Editor step, and propagation through the volume — all through the background process.

Nothing here blocks: requests go to a :class:`~SegmentWithSAMLib.backend.client.BackendClient` and
:meth:`SegmentationController.poll` (the widget calls it from a ``qt.QTimer``) picks up what has arrived.
Segments change only in :meth:`accept` and when a propagation has completed, each time after one
``SaveStateForUndo``; a failed or cancelled request changes nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import slicer

from SegmentWithSAMLib.backend.client import BackendClient, Handle
from SegmentWithSAMLib.errors import PromptError, SegmentWithSAMError
from SegmentWithSAMLib.geometry import View, Volume, prompts_to_slice, slice_axes, slices_with
from SegmentWithSAMLib.models import DEFAULT_MODEL

from . import mrml

PREVIEW_NODE_NAME = "SegmentWithSAM preview"
PREVIEW_SEGMENT = "preview"
PREVIEW_COLOR = (1.0, 0.85, 0.1)


@dataclass
class _Propagation:
    handle: Handle
    segmentation_node: object
    segment_id: str
    volume_node: object
    view: View
    seed: int
    direction: str
    before: np.ndarray  # the segment (KJI bool) when the propagation started
    keys: list[int]
    stream: np.ndarray = field(default=None)  # preview of the slices done so far (KJI bool)
    editor_node: object = None
    save_state: object = None


class SegmentationController:
    """The module's logic for one scene. ``client_factory(model, device)`` makes the backend client (tests and
    the widget choose the Python that runs it)."""

    def __init__(self, scene, client_factory=None) -> None:
        self.scene = scene
        self._client_factory = client_factory or (lambda model, device: BackendClient(model, device))
        self.client: BackendClient | None = None
        self._client_key: tuple | None = None
        self._volumes: dict[str, tuple[tuple, Volume]] = {}
        self.preview_handle: Handle | None = None
        self.preview_result = None
        self.preview_volume_node = None
        self._preview_sent = 0.0
        self.propagation: _Propagation | None = None
        self.last_accepted: tuple[str, str, View, int] | None = None  # segmentation ID, segment ID, view, slice
        self.last_accepted_box: np.ndarray | None = None  # the box prompt of that mask (slice pixels), if any
        self.status = ""
        self.progress: tuple[int, int] | None = None
        self.download: dict | None = None  # a model download in progress (see start_download)
        self.editor_logic = slicer.vtkSlicerSegmentEditorLogic()
        self.editor_logic.SetMRMLScene(scene)
        self._editor_node = None

    # ---- backend and inputs --------------------------------------------------------------------------------
    def engine(self, model: str = DEFAULT_MODEL, device: str | None = None) -> BackendClient:
        """The backend client for ``model`` on ``device`` (a new backend if either changed)."""
        if self.client is None or self._client_key != (model, device):
            if self.client is not None:
                self.client.close()
            self.client, self._client_key = self._client_factory(model, device), (model, device)
        return self.client

    def missing_model(self, model: str):
        """The registry entry of ``model`` if it must be downloaded before use (None if it is ready or is a
        path); raises :class:`PromptError` if it cannot be downloaded at all."""
        from SegmentWithSAMLib.models import registry

        entry = registry().get(model)
        if entry is None or entry.installed:
            return None
        if not entry.url:
            raise PromptError(f"{model} is not installed: {entry.manual_install}.")
        return entry

    def start_download(self, entry, url: str | None = None) -> None:
        """Download a model's checkpoint on a background thread (after the user agreed); :meth:`poll` reports
        progress in ``status`` and the outcome."""
        import threading

        from SegmentWithSAMLib.download import download

        if self.download is not None:
            raise PromptError("A download is already running.")
        job = {"entry": entry, "done": 0, "total": entry.size, "error": None, "finished": False, "cancel": False}

        def run() -> None:
            try:
                download(entry, url, progress=False, on_progress=lambda n, total: job.update(done=n, total=total),
                         cancel=lambda: job["cancel"])
            except SegmentWithSAMError as error:
                job["error"] = error
            job["finished"] = True

        self.download = job
        threading.Thread(target=run, name="model-download", daemon=True).start()

    def _poll_download(self) -> None:
        job = self.download
        if not job["finished"]:
            total = job["total"] or 0
            self.progress = (job["done"] >> 20, max(total >> 20, 1))
            self.status = f"Downloading {job['entry'].name}: {job['done'] >> 20} of {total >> 20} MB…"
            return
        self.download, self.progress = None, None
        self.status = (f"Download of {job['entry'].name} failed: {job['error']}" if job["error"]
                       else f"{job['entry'].name} is installed.")

    def close(self) -> None:
        if self.download is not None:
            self.download["cancel"] = True
        if self.client is not None:
            self.client.close()
            self.client = None

    def volume(self, volume_node) -> Volume:
        """The core volume of a node, rebuilt only when its voxels or geometry changed (hashing is costly)."""
        if volume_node is None:
            raise PromptError("Select an input volume first.")
        image = volume_node.GetImageData()
        stamp = (image.GetMTime() if image is not None else 0, mrml.world_ijk_to_ras(volume_node).tobytes())
        cached = self._volumes.get(volume_node.GetID())
        if cached is None or cached[0] != stamp:
            cached = (stamp, mrml.volume_from_node(volume_node))
            self._volumes = {volume_node.GetID(): cached}
        return cached[1]

    @staticmethod
    def window(volume_node, mode: str = "display"):
        """The intensity window: the volume's display window/level (``mode`` "display"), else ``mode`` as
        the core takes it ("auto", a CT preset name, or "W,L")."""
        if mode == "display":
            return mrml.display_window(volume_node) or "auto"
        return mode

    # ---- preview -------------------------------------------------------------------------------------------
    def request_preview(self, volume_node, positive_node, negative_node, roi_node, view, window=None,
                        model: str = DEFAULT_MODEL, device: str | None = None) -> Handle | None:
        """Ask for a mask from the current prompts on the slice of ``view`` they lie on. Bad prompts raise
        :class:`PromptError` at once; with no prompts the preview is cleared. Returns the request handle."""
        volume = self.volume(volume_node)
        view = View.parse(view)
        points, labels = mrml.ordered_clicks(positive_node, negative_node)
        box = mrml.roi_box(roi_node, volume, view)
        if not len(points) and box is None:
            self.clear_preview()
            return None
        if box is None and not (labels == 1).any():
            raise PromptError("Add a positive point or a box: negative points alone select nothing.")
        prompts_to_slice(volume, slice_axes(volume, view), np.concatenate([points, box if box is not None else
                                                                           np.zeros((0, 3))]))
        client = self.engine(model, device)
        self.preview_handle = client.predict(volume, view, points, labels, box,
                                             window if window is not None else self.window(volume_node),
                                             target=f"{volume_node.GetID()}/{view.value}")
        self.preview_volume_node = volume_node
        self._preview_sent = time.perf_counter()
        return self.preview_handle

    def _preview_node(self, volume_node):
        node = self.scene.GetFirstNodeByName(PREVIEW_NODE_NAME)
        if node is None:
            node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", PREVIEW_NODE_NAME)
            node.SetSaveWithScene(False)
            node.SetHideFromEditors(True)
            node.CreateDefaultDisplayNodes()
            node.GetSegmentation().AddEmptySegment(PREVIEW_SEGMENT, PREVIEW_SEGMENT, PREVIEW_COLOR)
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        return node

    def show_preview(self, volume_node, mask_kji: np.ndarray) -> None:
        mask, node = np.asarray(mask_kji, np.uint8), self._preview_node(volume_node)
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, node, PREVIEW_SEGMENT, volume_node)

    def clear_preview(self) -> None:
        self.preview_handle, self.preview_result = None, None
        node = self.scene.GetFirstNodeByName(PREVIEW_NODE_NAME)
        if node is not None:
            self.scene.RemoveNode(node)

    # ---- polling -------------------------------------------------------------------------------------------
    def poll(self) -> bool:
        """Apply what the backend has sent (previews, propagated slices, completions). Never blocks.
        Returns True while a request is still in flight."""
        if self.download is not None:
            self._poll_download()
        if self.client is None:
            return self.download is not None
        self.client.poll()
        handle = self.preview_handle
        if handle is not None and handle.done:
            self.preview_handle = None
            if handle.state == "done":
                self.preview_result = handle.result
                self.show_preview(self.preview_volume_node, handle.result.volume_mask())
                ms = (time.perf_counter() - self._preview_sent) * 1e3
                self.status = (f"Preview: {int(handle.result.mask2d.sum())} pixels on {handle.result.view.value} "
                               f"slice {handle.result.index}, quality {handle.result.score:.2f}, {ms:.0f} ms")
            elif handle.state == "failed":
                self.status = f"Preview failed: {handle.error}"
        if self.propagation is not None:
            self._poll_propagation()
        return self.preview_handle is not None or self.propagation is not None or self.download is not None

    def wait(self, timeout: float = 300.0) -> None:
        """Poll until nothing is in flight (scripts and tests; the GUI polls from a timer instead)."""
        deadline = time.monotonic() + timeout
        while self.poll():
            if time.monotonic() > deadline:
                raise TimeoutError(f"Still waiting for the backend after {timeout:g} s.")
            time.sleep(0.01)

    # ---- writing segments ----------------------------------------------------------------------------------
    def ensure_segment(self, segmentation_node, segment_id: str | None, volume_node, name: str = "SAM") -> str:
        """``segment_id`` if the segmentation has it, else a new empty segment's ID."""
        if segmentation_node is None:
            raise PromptError("Select or create a segmentation first.")
        segmentation = segmentation_node.GetSegmentation()
        if segment_id and segmentation.GetSegment(segment_id) is not None:
            return segment_id
        if segmentation.GetNumberOfSegments() == 0:
            segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        return segmentation.AddEmptySegment("", segmentation.GenerateUniqueSegmentID(name))

    def _modify(self, segmentation_node, segment_id: str, volume_node, new_kji: np.ndarray, editor_node=None,
                save_state=None) -> int:
        """Make the segment ``new_kji`` (KJI bool on the volume grid) in one undoable step, as Segment Editor
        effects do: save state (``save_state``, e.g. the Segment Editor widget's, or this logic's history),
        then add the new voxels and erase the dropped ones by labelmap, so only changed voxels are touched and
        the editor node's masking and overwrite settings apply. Returns how many voxels changed."""
        old = mrml.segment_array(segmentation_node, segment_id, volume_node)
        added, removed = new_kji & ~old, old & ~new_kji
        if not added.any() and not removed.any():
            return 0
        if editor_node is None:
            if self._editor_node is None or self._editor_node.GetScene() is None:
                self._editor_node = self.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
                self._editor_node.SetSaveWithScene(False)
            editor_node = self._editor_node
        logic = self.editor_logic
        logic.SetSegmentEditorNode(editor_node)
        logic.SetSegmentationNode(segmentation_node)
        logic.SetSourceVolumeNode(volume_node)
        logic.SetCurrentSegmentID(segment_id)
        if save_state is not None:
            save_state()
        else:
            logic.SaveStateForUndo()
        ijk_to_ras = mrml.world_ijk_to_ras(volume_node)
        for change, mode in ((added, logic.ModificationModeAdd), (removed, logic.ModificationModeRemove)):
            if change.any():
                logic.ModifySegmentByLabelmap(segmentation_node, segment_id, mrml.oriented_image(change, ijk_to_ras),
                                              mode, False, False)
        return int(added.sum() + removed.sum())

    def undo(self) -> None:
        """Undo the last change made through this logic's own history (Ctrl+Z in the Segment Editor does the
        same when the widget passes the editor's ``save_state``)."""
        self.editor_logic.Undo()

    def accept(self, segmentation_node, segment_id: str | None, editor_node=None, save_state=None) -> str:
        """Write the preview into the segment on its slice (replacing what the segment had there) as one
        undoable step; returns the segment ID (a new segment if none was given)."""
        result, volume_node = self.preview_result, self.preview_volume_node
        if result is None or volume_node is None or volume_node.GetScene() is None:
            raise PromptError("Nothing to accept: place points or a box and wait for the preview.")
        segment_id = self.ensure_segment(segmentation_node, segment_id, volume_node)
        new = mrml.segment_array(segmentation_node, segment_id, volume_node)
        result.axes.oriented(new)[result.index] = result.mask2d
        self._modify(segmentation_node, segment_id, volume_node, new, editor_node, save_state)
        self.last_accepted = (segmentation_node.GetID(), segment_id, result.view, result.index)
        self.last_accepted_box = result.box
        self.clear_preview()
        self.status = f"Accepted {int(result.mask2d.sum())} pixels into {segment_id} on slice {result.index}."
        return segment_id

    # ---- propagation ---------------------------------------------------------------------------------------
    def propagate(self, volume_node, segmentation_node, segment_id: str, view=None, seed: int | None = None,
                  direction: str = "both", slice_range: tuple[int, int] | None = None, rules: dict | None = None,
                  window=None, model: str = DEFAULT_MODEL, device: str | None = None, editor_node=None,
                  save_state=None, skip: int = 0) -> Handle:
        """Propagate the segment from slice ``seed`` of ``view`` (default: the slice last accepted) in the
        backend. The segment's other slices that the user made or edited are key slices: never overwritten,
        and propagation stops at them; slices an earlier propagation wrote (and nobody edited since) are
        recomputed. ``skip`` > 0: the model segments every (skip + 1)-th slice, the others are interpolated
        (faster on a CPU). The result is applied when complete, as one undoable step."""
        if self.propagation is not None:
            raise PromptError("A propagation is running: wait for it or cancel it first.")
        volume = self.volume(volume_node)
        if segmentation_node is None or not segment_id:
            raise PromptError("Select the segment to propagate.")
        last = self.last_accepted
        if view is None or seed is None:
            if last is None or last[:2] != (segmentation_node.GetID(), segment_id):
                raise PromptError("Accept a mask on a slice first (or give the seed view and slice).")
            view, seed = last[2] if view is None else view, last[3] if seed is None else seed
        view = View.parse(view)
        axes = slice_axes(volume, view)
        before = mrml.segment_array(segmentation_node, segment_id, volume_node)
        oriented = axes.oriented(before)
        if not 0 <= seed < axes.num_slices or not oriented[seed].any():
            raise PromptError(f"The segment is empty on {view.value} slice {seed}: accept a mask there first.")
        written = mrml.propagated_slices(segmentation_node, segment_id, view)
        keys = [int(i) for i in slices_with(axes, before)
                if i != seed and written.get(int(i)) != mrml.mask_crc(oriented[i])]
        # The box the seed mask was made from guides propagation when the seed is the slice just accepted.
        box = self.last_accepted_box if last == (segmentation_node.GetID(), segment_id, view, seed) else None
        client = self.engine(model, device)
        handle = client.propagate(volume, view, {"segment": (seed, oriented[seed])}, direction, slice_range,
                                  {"segment": {i: oriented[i] for i in keys}} if keys else None, rules,
                                  window if window is not None else self.window(volume_node),
                                  boxes={"segment": box} if box is not None else None, skip=skip)
        self.propagation = _Propagation(handle, segmentation_node, segment_id, volume_node, view, seed, direction,
                                        before, keys, np.zeros_like(before), editor_node, save_state)
        self.progress = (0, axes.num_slices)
        self.status = f"Propagating from {view.value} slice {seed}…"
        return handle

    def cancel(self) -> None:
        """Stop the running propagation (within one slice), any pending preview and a model download; nothing
        is applied (a download keeps its partial file to resume)."""
        if self.download is not None:
            self.download["cancel"] = True
        if self.client is not None:
            for handle in (self.preview_handle, self.propagation.handle if self.propagation else None):
                if handle is not None:
                    self.client.cancel(handle)

    def _poll_propagation(self) -> None:
        job = self.propagation
        axes = slice_axes(self.volume(job.volume_node), job.view)
        events = job.handle.take_events()
        for step in events:
            axes.oriented(job.stream)[step.index] = step.masks["segment"]
        if events:
            self.show_preview(job.volume_node, job.stream)
            self.progress = job.handle.progress
        if not job.handle.done:
            return
        self.propagation = None
        self.progress = None
        self.clear_preview()
        if job.handle.state == "done":
            try:
                self.status = self._apply_propagation(job, job.handle.result)
            except SegmentWithSAMError as error:
                self.status = f"Propagation not applied: {error}"
        elif job.handle.state == "cancelled":
            self.status = "Propagation cancelled; the segment is unchanged."
        else:
            self.status = f"Propagation failed; the segment is unchanged. {job.handle.error or ''}".strip()

    def _apply_propagation(self, job: _Propagation, result) -> str:
        current = mrml.segment_array(job.segmentation_node, job.segment_id, job.volume_node)
        if not np.array_equal(current, job.before):
            raise PromptError("the segment was edited while propagating; propagate again.")
        axes = slice_axes(self.volume(job.volume_node), job.view)
        new = current.copy()
        oriented = axes.oriented(new)
        written = mrml.propagated_slices(job.segmentation_node, job.segment_id, job.view)
        up = min([k for k in job.keys if k > job.seed], default=axes.num_slices)
        down = max([k for k in job.keys if k < job.seed], default=-1)
        reach = {"up": range(job.seed + 1, up), "down": range(down + 1, job.seed),
                 "both": [*range(down + 1, job.seed), *range(job.seed + 1, up)]}[str(job.direction)]
        stale = [i for i in reach if i in written and i not in job.keys]
        for index in stale:  # an earlier propagation's slices in this reach are recomputed, not mixed
            oriented[index] = False
            written.pop(index)
        masks = result.masks.get("segment", {})
        for index, mask in masks.items():
            oriented[index] = mask
            written[index] = mrml.mask_crc(mask)
        if not self._modify(job.segmentation_node, job.segment_id, job.volume_node, new, job.editor_node,
                            job.save_state):
            return "Propagation found nothing to change."
        mrml.set_propagated_slices(job.segmentation_node, job.segment_id, job.view, written)
        stops = "; ".join(f"{d}: {why}" for d, why in result.stopped.get("segment", {}).items())
        return f"Propagated to {len(masks)} slices in {result.seconds:.1f} s ({stops})."
