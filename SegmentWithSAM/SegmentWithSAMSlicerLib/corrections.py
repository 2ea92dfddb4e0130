"""Corrections in 3D: clicks, scribbles and lassos placed on a segment, as steps of the one engine, shown as a
preview and written by Accept as one undoable step. A part of :class:`~.logic.SegmentationController` (its state
and writes live there), kept apart for its size.
"""

from __future__ import annotations

import numpy as np

from SegmentWithSAMLib.actions import click_from_ras, stroke_from_ras
from SegmentWithSAMLib.backend.client import Handle
from SegmentWithSAMLib.errors import PromptError
from SegmentWithSAMLib.geometry import View
from SegmentWithSAMLib.models import DEFAULT_MODEL
from SegmentWithSAMLib.strokes import SAMPLE_MM, sample_polyline

from .interactive import Pending


class Corrections:
    """The 3D corrections of :class:`~.logic.SegmentationController` (a mixin: it uses the controller's state)."""

    def click_3d(self, volume_node, segmentation_node, segment_id: str, point_ras, positive: bool, view=None,
                 window=None, model: str = DEFAULT_MODEL, device: str | None = None, editor_node=None,
                 save_state=None, auto_accept: bool = False) -> Handle:
        """A positive or negative click at ``point_ras`` (any voxel, placed in any view) corrects the segment in
        3D: the slice through it along the segment's propagation view (``view``, default the view it was
        accepted in) is refined and the change is carried to the neighbouring slices (:class:`~SegmentWithSAMLib.
        engine.Engine`). The slices that would change show as the preview; :meth:`accept` writes the result of
        all corrections since as one undoable step (``auto_accept``: each one's result is written as it
        arrives). Corrections made while one is computed wait their turn. Bad clicks raise :class:`PromptError`
        at once and change nothing."""
        return self._correct(volume_node, segmentation_node, segment_id, view, window, model, device, editor_node,
                             save_state, auto_accept, lambda volume, axes: click_from_ras(volume, axes, point_ras,
                                                                                          positive))

    def stroke_3d(self, volume_node, segmentation_node, segment_id: str, points_ras, positive: bool,
                  closed: bool = False, view=None, window=None, model: str = DEFAULT_MODEL, device: str | None = None,
                  editor_node=None, save_state=None, auto_accept: bool = False) -> Handle:
        """A scribble (or, ``closed``, a lasso) through ``points_ras`` (N, 3) on one slice, as :meth:`click_3d`
        corrects with a click; a positive one also starts an empty segment (on ``view``: give the view it was
        drawn in). A scribble drawn on another view's slice corrects as clicks every 2 mm along it would."""
        points = np.asarray(points_ras, dtype=float).reshape(-1, 3)

        def action(volume, axes):
            try:
                return [stroke_from_ras(volume, axes, points, positive, closed)]
            except PromptError as error:
                if closed or "different" not in str(error):
                    raise
            # drawn across the engine's slices (on another view's): clicks along it, each on its own slice
            return [click_from_ras(volume, axes, p, positive) for p in sample_polyline(points, SAMPLE_MM)]

        return self._correct(volume_node, segmentation_node, segment_id, view, window, model, device, editor_node,
                             save_state, auto_accept, action, starts=positive)

    def _correct(self, volume_node, segmentation_node, segment_id, view, window, model, device, editor_node,
                 save_state, auto_accept, make_action, starts: bool = False) -> Handle:
        """Queue the action(s) ``make_action(volume, axes)`` makes as a correction of the segment in 3D (see
        :meth:`click_3d`); ``starts``: they may start an empty segment."""
        volume = self.volume(volume_node)
        if segmentation_node is None or not segment_id:
            raise PromptError("Select the segment to correct.")
        job = self.refinement
        if job is not None and (job.segmentation_node, job.segment_id) != (segmentation_node, segment_id):
            raise PromptError("Accept or clear the 3D correction of the other segment first.")
        if job is None:
            view = View.parse(view) if view is not None else self.segment_view(segmentation_node, segment_id)
            job = self._pending("correction", volume_node, segmentation_node, segment_id, view, window,
                                editor_node, save_state, auto_accept)
            if not starts and (job.state is None or not any(m.any() for m in job.state.masks.values())):
                raise PromptError("The segment is empty: accept a mask on a slice first, then click to correct it "
                                  "in 3D.")
        actions = make_action(volume, job.axes)
        self.engine(model, device)
        self.refinement = job
        job.waiting.extend(actions if isinstance(actions, list) else [actions])
        if job.handle is None:
            self._send_click(job)
        return job.handle

    def _send_click(self, job: Pending) -> None:
        action = job.waiting.pop(0)
        self._send(job, action)
        sign = "positive" if action.positive else "negative"
        self.status = f"Correcting in 3D ({sign} {type(action).__name__.lower()})…"

    def _poll_refinement(self) -> None:
        job = self.refinement
        handle = job.handle
        if not handle.done:
            return
        job.handle = None
        if handle.state != "done":
            job.waiting.clear()
            reason = "cancelled" if handle.state == "cancelled" else f"failed: {handle.error or handle.message}"
            self.fail(f"The 3D click {reason}; the segment is unchanged.")
            if not job.changed:  # nothing pending any more (its status stays: it says why)
                self.refinement = None
                self.clear_preview()
            return
        state, update = handle.result
        job.add(update, state)
        if job.waiting:
            self._send_click(job)
            return
        self.revision += 1
        self.show_preview(job.volume_node, *job.preview_block(job.changed_masks()))
        stops = "; ".join(f"{d}: {why}" for d, why in update.stopped.items())
        self.status = " ".join([f"3D click: {len(update.changed)} slices changed ({stops}) in {update.seconds:.1f} s.",
                                *update.notices])
        if job.auto_accept:
            self._apply_refinement()
        else:
            self.status += " Accept writes the corrected slices."

    def _apply_refinement(self) -> str:
        """Write the pending clicks' result as one undoable step and remember the state."""
        job = self.refinement
        if job.handle is not None:
            raise PromptError("A 3D click is still being computed: wait for its preview, then accept.")
        self.refinement = None
        self.clear_preview()
        before = self._segment_as_before(job)
        if before is None:
            raise PromptError("The segment was edited while the 3D correction was pending; it was not applied. "
                              "Click again.")
        changed = self._write_job(job, before)
        if not changed:
            self._remember(job, False)
        name = job.segmentation_node.GetSegmentation().GetSegment(job.segment_id).GetName()
        self.status = (f"Corrected {len(job.changed)} {job.view.value} slices of {name} in 3D "
                       f"({changed} voxels changed).")
        return job.segment_id

    def discard_refinement(self) -> None:
        """Drop the pending 3D correction (Clear); the segment stays as it is."""
        job, self.refinement = self.refinement, None
        if job is not None:
            if job.handle is not None and self.client is not None:
                self.client.cancel(job.handle)
            self.clear_preview()
            self.status = "The 3D correction was dropped; the segment is as it was."

