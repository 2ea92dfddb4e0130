"""What the SegmentWithSAM module does, without Qt: live previews from markups prompts, accept into a segment
as one undoable Segment Editor step, propagation through the volume and clicks in 3D, all as steps of the one
engine (:meth:`SegmentWithSAMLib.engine.Engine.step`) in the background process.

Each step applies to the segment's engine state (:func:`.interactive.state_from_segment`): the backend keeps it
under a version, so a step on a segment nobody edited sends only the action and gets back only what changed.
Nothing here blocks: requests go to a :class:`~SegmentWithSAMLib.backend.client.BackendClient` and
:meth:`SegmentationController.poll` (the widget calls it from a ``qt.QTimer``) picks up what has arrived.
Segments change only in :meth:`accept` and when a propagation has completed, each time after one
``SaveStateForUndo``; a failed or cancelled request changes nothing.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from SegmentWithSAMLib.actions import Propagate, prompt_from_ras
from SegmentWithSAMLib.backend.client import BackendClient, Handle
from SegmentWithSAMLib.errors import PromptError, SegmentWithSAMError
from SegmentWithSAMLib.geometry import View, Volume, slice_axes
from SegmentWithSAMLib.models import DEFAULT_MODEL
from SegmentWithSAMLib.propagation import StopRules
from SegmentWithSAMLib.state import ObjectState

from . import mrml, suggestion_marker
from .backend_choice import BackendChoice
from .corrections import Corrections
from .editing import SegmentEditing
from .finished import KeepOut
from .interactive import Pending, SegmentCache, state_from_segment
from .model_download import ModelDownload

PREVIEW_NODE_NAME = "SegmentWithSAM preview"
PREVIEW_SEGMENT = "preview"
PREVIEW_COLOR = (1.0, 0.85, 0.1)


class SegmentationController(Corrections):
    """The module's logic for one scene. ``client_factory(model, device)`` makes the backend client on this
    computer (tests and the widget choose the Python that runs it); :meth:`use_backend` chooses a server instead."""

    def __init__(self, scene, client_factory=None) -> None:
        self.scene = scene
        self._client_factory = client_factory or (lambda model, device: BackendClient(model, device))
        self.client: BackendClient | None = None
        self._client_key: tuple | None = None
        self.backend = BackendChoice()  # this computer or a server, the server's access key, a connection test
        self._volumes: dict[str, tuple[tuple, Volume]] = {}
        self.preview: Pending | None = None  # a 2D prompt's result, written on Accept
        self.propagation: Pending | None = None  # written when it completes
        self.refinement: Pending | None = None  # clicks in 3D, written on Accept (or each at once)
        self.suggestion: Pending | None = None  # where to click next, asked of the backend
        self.suggested: dict | None = None  # its answer: text, hint, ras, or only the text why there is none
        self.revision = 0  # counts the states the steps made (a new one is worth a new suggestion)
        self._preview_sent = 0.0
        self.last_accepted: tuple[str, str, View, int] | None = None  # segmentation ID, segment ID, view, slice
        self.last_accepted_range: tuple[int, int] | None = None  # the slices its box spans, if it was 3D
        self._remembered: dict[tuple, object] = {}  # (segmentation, segment, view) → state after its last step
        self._status = ("", False)
        self.progress: tuple[int, int] | None = None
        self.download: ModelDownload | None = None  # a model download in progress
        self.editing = SegmentEditing(scene)
        self._segments = SegmentCache()  # segments as last read: a prompt event reads none that did not change
        self._state_memo: tuple | None = None  # the last state rebuilt from a segment, and what it came from
        self._keep_out = KeepOut()  # the finished segments a segment's steps keep out of

    # ---- backend and inputs --------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        """What the last operation did or is doing, in a sentence."""
        return self._status[0]

    @status.setter
    def status(self, text: str) -> None:
        self._status = (text, False)

    @property
    def status_error(self) -> bool:
        """Whether :attr:`status` reports a failure (set by :meth:`fail`)."""
        return self._status[1]

    def fail(self, text: str) -> None:
        """A failure: the status says what failed and what was kept."""
        self._status = (text, True)

    def engine(self, model: str = DEFAULT_MODEL, device: str | None = None) -> BackendClient:
        """The backend client for ``model`` on ``device`` (a new backend if either changed), or a session on the
        chosen server, which serves its own model (a new session if the server or the key changed)."""
        server = self.backend.server
        if self.client is None or self._client_key != (server or (model, device)):
            if self.client is not None:
                self.client.close()  # nothing accepted is lost: the segments are in MRML, their states here
            self.client = server.client() if server is not None else self._client_factory(model, device)
            self._client_key = server or (model, device)
        return self.client

    def use_backend(self, backend: str, address: str = "", cafile: str = "") -> None:
        """Send the next requests to this computer's backend ("local") or to the server at ``address``
        ("server", with :attr:`backend`'s key); :meth:`engine` then closes the current client. Bad input raises
        :class:`BackendError` and changes nothing."""
        server = self.backend.chosen(backend, address, cafile)
        busy = self.propagation is not None or (self.refinement is not None and self.refinement.handle is not None)
        if server != self.backend.server and busy:
            raise PromptError("Wait for the propagation or 3D click (or cancel it) before changing the backend.")
        self.backend.server = server

    def test_connection(self, address: str, cafile: str = "") -> None:
        """Check the server at ``address`` with :attr:`backend`'s key in the background; :meth:`poll` reports
        what it serves, or why it cannot be reached. Bad input raises :class:`BackendError` at once."""
        self.status = self.backend.start_test(address, cafile)

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
        if self.download is not None:
            raise PromptError("A download is already running.")
        self.download = ModelDownload(entry, url)

    def _poll_download(self) -> None:
        job = self.download
        if not job.finished:
            total = job.total or 0
            self.progress = (job.done >> 20, max(total >> 20, 1))
            self.status = f"Downloading {job.entry.name}: {job.done >> 20} of {total >> 20} MB…"
            return
        self.download, self.progress = None, None
        if job.error:
            self.fail(f"Download of {job.entry.name} failed: {job.error}")
        else:
            self.status = f"{job.entry.name} is installed."

    def close(self) -> None:
        if self.download is not None:
            self.download.cancel()
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

    # ---- steps ---------------------------------------------------------------------------------------------
    def segment_view(self, segmentation_node, segment_id: str) -> View:
        """The view a segment's 3D steps work on: the one it was last accepted in here, else axial."""
        last = self.last_accepted
        accepted_here = last is not None and last[:2] == (segmentation_node.GetID(), segment_id)
        return last[2] if accepted_here else View.AXIAL

    def _pending(self, kind: str, volume_node, segmentation_node, segment_id: str | None, view: View,
                 window, editor_node=None, save_state=None, auto_accept: bool = False) -> Pending:
        """A step's record on the segment (its state rebuilt from the segment; an unknown or no segment: a new
        object)."""
        volume = self.volume(volume_node)
        axes = slice_axes(volume, view)
        known = segmentation_node is not None and bool(segment_id) \
            and segmentation_node.GetSegmentation().GetSegment(segment_id) is not None
        before = self._segments.array(segmentation_node, segment_id, volume_node) if known \
            else np.zeros(volume.array.shape, bool)
        state = None
        if known:
            key = (segmentation_node.GetID(), segment_id, view)
            source = (key, before, mrml.propagated_slices(segmentation_node, segment_id, view),
                      self._remembered.get(key))
            memo = self._state_memo
            if memo is not None and memo[0] == key and memo[1] is before and memo[2] == source[2] \
                    and memo[3] is source[3]:
                state = memo[4]  # the same segment, tag and remembered state: the same state, without a scan
            else:
                state = state_from_segment(axes.oriented(before), axes, source[2], source[3])
                self._state_memo = (*source, state)
        keep = self._keep_out(segmentation_node, segment_id if known else None, volume_node, axes)
        current = state.keep_out if state is not None else {}
        if keep is not current and (keep or current):  # a new state only when what it keeps out of changed
            state = replace(state if state is not None else ObjectState((0, axes.num_slices - 1)), keep_out=keep)
        return Pending(kind, segmentation_node, segment_id, volume_node, view, axes, before, state, editor_node,
                       save_state, auto_accept, window if window is not None else self.window(volume_node))

    def _send(self, job: Pending, action, target: str | None = None) -> Handle:
        volume = self.volume(job.volume_node)
        self.clear_suggestion()  # a step makes it stale
        key = job.key if job.segmentation_node is not None else f"preview/{job.view.value}"
        job.handle = self.client.step(volume, job.view, key, job.state, action, job.window, target)
        return job.handle

    # ---- preview -------------------------------------------------------------------------------------------
    def request_preview(self, volume_node, positive_node, negative_node, roi_node, view, window=None,
                        model: str = DEFAULT_MODEL, device: str | None = None, segmentation_node=None,
                        segment_id: str | None = None) -> Handle | None:
        """Ask for a mask from the current prompts on the slice of ``view`` they lie on, as a step on the
        segment ``segment_id`` (if given: Accept into it then keeps its box and range for propagation and
        clicks). Bad prompts raise :class:`PromptError` at once; with no prompts the preview is cleared.
        Returns the request handle."""
        volume = self.volume(volume_node)
        view = View.parse(view)
        points, labels = mrml.ordered_clicks(positive_node, negative_node)
        box = mrml.roi_box(roi_node, volume, view)
        if not len(points) and box is None:
            self.clear_preview()
            return None
        if box is None and not (labels == 1).any():
            raise PromptError("Add a positive point or a box: negative points alone select nothing.")
        slice_range = mrml.roi_slice_range(roi_node, volume, view) if box is not None else None
        action = prompt_from_ras(volume, slice_axes(volume, view), points, labels, box, slice_range)
        self.engine(model, device)
        job = self._pending("preview", volume_node, segmentation_node, segment_id, view, window)
        job.slice_range = slice_range
        self._send(job, action, target=f"{volume_node.GetID()}/{view.value}")
        self.preview = job
        self._preview_sent = time.perf_counter()
        return job.handle

    @property
    def preview_result(self):
        """The preview's :class:`~SegmentWithSAMLib.state.Update` once it arrived (None before)."""
        return self.preview.update if self.preview is not None else None

    @property
    def preview_handle(self) -> Handle | None:
        return self.preview.handle if self.preview is not None else None

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

    def show_preview(self, volume_node, block: mrml.Block, mask_kji: np.ndarray) -> None:
        """Show ``mask_kji`` (KJI bool of ``block`` of the volume) as the preview, and nothing else."""
        mrml.write_block(self._preview_node(volume_node), PREVIEW_SEGMENT, volume_node, mask_kji, block)

    def clear_preview(self) -> None:
        job, self.preview = self.preview, None
        if job is not None and job.handle is not None and self.client is not None:
            self.client.cancel(job.handle)
        node = self.scene.GetFirstNodeByName(PREVIEW_NODE_NAME)
        if node is not None:
            self.scene.RemoveNode(node)

    # ---- polling -------------------------------------------------------------------------------------------
    def poll(self) -> bool:
        """Apply what the backend has sent (previews, propagated slices, completions). Never blocks.
        Returns True while a request is still in flight."""
        if self.download is not None:
            self._poll_download()
        if (tested := self.backend.test_outcome()) is not None:
            self._status = tested
        if self.client is None:
            return self.download is not None or self.backend.testing
        self.client.poll()
        if self.preview is not None and self.preview.handle is not None and self.preview.handle.done:
            self._poll_preview()
        if self.propagation is not None:
            self._poll_propagation()
        if self.refinement is not None and self.refinement.handle is not None:
            self._poll_refinement()
        if self.suggestion is not None and self.suggestion.handle.done:
            self._poll_suggestion()
        busy = [job for job in (self.preview, self.propagation, self.refinement, self.suggestion)
                if job is not None and job.handle is not None]
        return bool(busy) or self.download is not None or self.backend.testing

    def _poll_preview(self) -> None:
        job = self.preview
        handle, job.handle = job.handle, None
        if handle.state != "done":
            self.preview = None
            if handle.state == "failed":
                self.fail(f"Preview failed: {handle.error}")
            return
        state, update = handle.result
        job.add(update, state)
        (index, mask), = update.changed.items()
        self.show_preview(job.volume_node, *job.preview_block(job.changed_masks()))
        ms = (time.perf_counter() - self._preview_sent) * 1e3
        self.status = " ".join([f"Preview: {int(mask.sum())} pixels on {job.view.value} slice {index}, "
                                f"{ms:.0f} ms.", *update.notices])

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

    def undo(self) -> None:
        """Undo the last change made through this logic's own history (Ctrl+Z in the Segment Editor does the
        same when the widget passes the editor's ``save_state``)."""
        self.editing.undo()

    def accept(self, segmentation_node, segment_id: str | None, editor_node=None, save_state=None) -> str:
        """Write the preview into the segment on its slice (replacing what the segment had there) as one
        undoable step; returns the segment ID (a new segment if none was given). With clicks in 3D pending
        (:meth:`click_3d`), writes their result instead."""
        if self.refinement is not None:
            return self._apply_refinement()
        job = self.preview
        if job is None or job.update is None or job.volume_node.GetScene() is None:
            raise PromptError("Nothing to accept: place points or a box and wait for the preview.")
        segment_id = self.ensure_segment(segmentation_node, segment_id, job.volume_node)
        (index, mask), = job.update.changed.items()
        before = self._segments.array(segmentation_node, segment_id, job.volume_node)
        block = job.slice_block([index])
        new = before[mrml.block_index(block)].copy()
        job.axes.oriented(new)[0] = mask
        written = self.editing.write(segmentation_node, segment_id, job.volume_node, new, editor_node, save_state,
                                     block)
        self._segments.patch(segmentation_node, segment_id, job.volume_node, before, written)
        if (job.segmentation_node, job.segment_id) != (segmentation_node, segment_id):
            # previewed for another segment (or none): this one's state is its voxels with the mask accepted, with
            # the prompt's slice, box, range and rules
            job.segmentation_node, job.segment_id = segmentation_node, segment_id
            wanted = before.copy()
            wanted[mrml.block_index(block)] = new
            job.state = state_from_segment(job.axes.oriented(wanted), job.axes,
                                           mrml.propagated_slices(segmentation_node, segment_id, job.view), job.state)
        self._remember(job, np.array_equal(written.segment, new))
        self.last_accepted = (segmentation_node.GetID(), segment_id, job.view, index)
        self.last_accepted_range = job.slice_range
        self.revision += 1
        self.clear_preview()
        self.status = self._accepted_status(written, new, segment_id, index)
        return segment_id

    def _remember(self, job: Pending, complete: bool) -> None:
        """Keep the job's newest state for the segment, and tag the slices the engine wrote. ``complete``: its
        result was written whole (no voxel kept out by masking), so the segment is now exactly that state (its
        unchanged slices matched the segment before, its changed ones were written): the next step on the
        segment takes it without scanning the segment (:meth:`_pending`)."""
        written = mrml.propagated_slices(job.segmentation_node, job.segment_id, job.view)
        written = {i: crc for i, crc in written.items() if i not in job.state.kinds}
        written.update(job.engine_slices())
        mrml.set_propagated_slices(job.segmentation_node, job.segment_id, job.view, written)
        key = (job.segmentation_node.GetID(), job.segment_id, job.view)
        self._remembered[key] = job.state
        segment = self._segments.current(job.segmentation_node, job.segment_id, job.volume_node) if complete else None
        if segment is not None:
            self._state_memo = (key, segment, written, job.state, job.state)

    @staticmethod
    def _accepted_status(written, wanted: np.ndarray, segment_id: str, index: int) -> str:
        """What an accept actually wrote (a :class:`~.editing.Written` for ``wanted``, KJI bool of its block),
        saying so when the editor's masking kept part of the mask out."""
        changed = written.count
        if not changed:
            return (f"Nothing was written into {segment_id} on slice {index}: it already had this mask, or the "
                    "Segment Editor's masking settings (editable area, intensity range) exclude it.")
        missing = int(np.count_nonzero(wanted & ~written.segment))
        kept_out = (f"; {missing} voxels were kept out (the Segment Editor's masking settings, or outside the "
                    "segmentation's geometry)") if missing else ""
        return f"Accepted into {segment_id} on slice {index}: {changed} voxels changed{kept_out}."

    # ---- propagation ---------------------------------------------------------------------------------------
    def propagate(self, volume_node, segmentation_node, segment_id: str, view=None, seed: int | None = None,
                  direction: str = "both", slice_range: tuple[int, int] | None = None, rules: dict | None = None,
                  window=None, model: str = DEFAULT_MODEL, device: str | None = None, editor_node=None,
                  save_state=None, skip: int = 0) -> Handle:
        """Propagate the segment from slice ``seed`` of ``view`` (default: the slice last accepted) in the
        backend. The segment's other slices that the user made or edited are key slices: never overwritten,
        and propagation stops at them; slices an earlier propagation wrote (and nobody edited since) are
        recomputed. A 3D box accepted on the seed gives the range (within it only empty masks stop) unless
        ``slice_range`` is given. ``skip`` > 0: the model segments every (skip + 1)-th slice, the others are
        interpolated (faster on a CPU). The result is applied when complete, as one undoable step."""
        if self.propagation is not None:
            raise PromptError("A propagation is running: wait for it or cancel it first.")
        self.volume(volume_node)
        if segmentation_node is None or not segment_id:
            raise PromptError("Select the segment to propagate.")
        last = self.last_accepted
        if view is None or seed is None:
            if last is None or last[:2] != (segmentation_node.GetID(), segment_id):
                raise PromptError("Accept a mask on a slice first (or give the seed view and slice).")
            view, seed = last[2] if view is None else view, last[3] if seed is None else seed
        view = View.parse(view)
        job = self._pending("propagation", volume_node, segmentation_node, segment_id, view, window, editor_node,
                            save_state)
        if job.state is None or not 0 <= seed < job.axes.num_slices or seed not in job.state.masks \
                or not job.state.masks[seed].any():
            raise PromptError(f"The segment is empty on {view.value} slice {seed}: accept a mask there first.")
        self.engine(model, device)
        self._send(job, Propagate(int(seed), str(getattr(direction, "value", direction)), slice_range,
                                  StopRules(**rules) if rules else None, skip))
        self.propagation = job
        self.progress = (0, job.axes.num_slices)
        self.status = f"Propagating from {view.value} slice {seed}…"
        return job.handle

    def cancel(self) -> None:
        """Stop the running propagation (within one slice), any pending preview or click and a model download;
        nothing is applied (a download keeps its partial file to resume)."""
        if self.download is not None:
            self.download.cancel()
        if self.client is not None:
            for job in (self.preview, self.propagation, self.refinement):
                if job is not None and job.handle is not None:
                    self.client.cancel(job.handle)

    def _poll_propagation(self) -> None:
        job = self.propagation
        events = job.handle.take_events()
        job.stream.update(events)
        if events:
            self.progress = job.handle.progress
        if not job.handle.done:
            if events:
                self.show_preview(job.volume_node, *job.preview_block(job.stream))
            return
        handle, job.handle = job.handle, None
        self.propagation, self.progress = None, None
        self.clear_preview()
        if handle.state == "done":
            try:
                self.status = self._apply_propagation(job, *handle.result)
            except SegmentWithSAMError as error:
                self.fail(f"Propagation not applied: {error}")
        elif handle.state == "cancelled":
            self.status = "Propagation cancelled; the segment is unchanged."
        else:
            self.fail(f"Propagation failed; the segment is unchanged. {handle.error or ''}".strip())

    def _segment_as_before(self, job: Pending) -> np.ndarray | None:
        """The segment's read if it is still as when the job began (None if it was edited since): known from its
        labelmap's stamp, read again only when that changed (e.g. another segment of its layer was edited)."""
        if self._segments.current(job.segmentation_node, job.segment_id, job.volume_node) is job.before:
            return job.before
        current = self._segments.array(job.segmentation_node, job.segment_id, job.volume_node)
        return current if np.array_equal(current, job.before) else None

    def _write_job(self, job: Pending, before: np.ndarray) -> int:
        """Write the job's changed slices into its segment (``before``: the segment's read) as one step and
        remember its state; returns how many voxels changed."""
        block, new = job.result_block()
        written = self.editing.write(job.segmentation_node, job.segment_id, job.volume_node, new, job.editor_node,
                                     job.save_state, block)
        self._segments.patch(job.segmentation_node, job.segment_id, job.volume_node, before, written)
        if written.count:
            self._remember(job, np.array_equal(written.segment, new))
        return written.count

    def _apply_propagation(self, job: Pending, state, update) -> str:
        before = self._segment_as_before(job)
        if before is None:
            raise PromptError("the segment was edited while propagating; propagate again.")
        job.add(update, state)
        self.revision += 1
        if not self._write_job(job, before):
            return "Propagation found nothing to change."
        stops = "; ".join(f"{d}: {why}" for d, why in update.stopped.items())
        return f"Propagated to {len(update.changed)} slices in {update.seconds:.1f} s ({stops})."

    # ---- where to click next -------------------------------------------------------------------------------
    def suggest(self, volume_node, segmentation_node, segment_id: str, window=None, model: str = DEFAULT_MODEL,
                device: str | None = None) -> Handle:
        """Ask the backend where to click next on the segment (:mod:`SegmentWithSAMLib.suggest`), on the state
        the next click would correct: a pending 3D correction's or preview's, else the segment's own on the view
        it was accepted in. :meth:`poll` then shows the place (:mod:`.suggestion_marker`) and :attr:`suggested`
        says why; nothing else changes."""
        self.volume(volume_node)
        if segmentation_node is None or not segment_id:
            raise PromptError("Select the segment to suggest a click for.")
        job = next((j for j in (self.refinement, self.preview) if j is not None and j.state is not None
                    and (j.segmentation_node, j.segment_id) == (segmentation_node, segment_id)), None)
        if job is None:
            job = self._pending("suggestion", volume_node, segmentation_node, segment_id,
                                self.segment_view(segmentation_node, segment_id), window)
        if job.state is None or not any(mask.any() for mask in job.state.masks.values()):
            raise PromptError("The segment is empty: segment it first, then ask where to click next.")
        self.engine(model, device)
        self.clear_suggestion()
        self.suggestion = Pending("suggestion", segmentation_node, segment_id, volume_node, job.view, job.axes,
                                  job.before, job.state, window=job.window)
        self.suggestion.handle = self.client.suggest(self.volume(volume_node), job.view, job.key, job.state,
                                                     job.window, target=f"suggest/{job.key}")
        return self.suggestion.handle

    def _poll_suggestion(self) -> None:
        job, self.suggestion = self.suggestion, None
        handle = job.handle
        if handle.state == "done":
            found = handle.result
            ras = found.ras(self.volume(job.volume_node), job.axes)
            suggestion_marker.show(self.scene, ras, found.hint)
            sign = "positive" if found.hint == "add" else "negative"
            self.suggested = {"text": f"Next: a {sign} click at the marker ({job.view.value} slice {found.index}). "
                                      f"{found.reason}", "hint": found.hint, "ras": [float(v) for v in ras]}
        elif handle.state == "failed" and getattr(handle.error, "kind", "") == "PromptError":
            self.suggested = {"text": str(handle.error), "hint": None, "ras": None}  # nothing looks wrong
        elif handle.state == "failed":
            self.fail(f"No suggestion: {handle.error}")

    def clear_suggestion(self) -> None:
        """No suggestion: the marker removed, a request in flight cancelled."""
        job, self.suggestion, self.suggested = self.suggestion, None, None
        if job is not None and self.client is not None:
            self.client.cancel(job.handle)
        suggestion_marker.clear(self.scene)
