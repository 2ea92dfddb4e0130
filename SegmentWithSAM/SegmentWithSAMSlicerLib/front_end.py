"""The front-end rules both the desktop panel and the web app follow, in one place (the panel and the page only
bind widgets to it):

- placed prompts: a box always previews on its slice; points on a segment that has voxels correct it in 3D
  (each point once, in click order); other points preview on their slice when live preview is on; a stroke
  (scribble or lasso, a markups curve) is sent when the user stops placing it, as a correction in 3D (a positive
  one starts an empty segment on the view it was drawn in), and its node is emptied for the next;
- which view holds the prompts (the slice view whose plane they lie on);
- the prompt markups nodes (names and colours) and clearing them in one step;
- the propagation range: the panel's range if set, else the whole volume when asked, else the accepted box's;
- finished segments: marked, and shown for the selected segment (:mod:`.finished` keeps the others out);
- where to click next: asked for, or after each step that made a new state when the settings say so; the views
  move to show its marker, and taking it places the point it suggests (a positive or negative click);
- one status line: an error stays until the user's next action, even while background results arrive; a
  background failure replaces what is shown;
- the backend: each request goes where the settings say (this computer, or a server, whose model is used and
  needs nothing downloaded or installed here); the server's fields apply only when a server is chosen.

What differs between the two hosts is behind :class:`Host`: which nodes are selected, the slice nodes, and the
Segment Editor node + undo-state function writes go through.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from SegmentWithSAMLib.errors import PromptError, SegmentWithSAMError
from SegmentWithSAMLib.geometry import View, slice_axes

from . import mrml
from .finished import is_finished, set_finished
from .logic import SegmentationController
from .settings import Settings, device_of, runs_here, stop_rules

POSITIVE_COLOR, NEGATIVE_COLOR = (0.2, 0.9, 0.2), (0.95, 0.2, 0.2)
PROMPTS = {"positive": ("vtkMRMLMarkupsFiducialNode", "SAM positive", POSITIVE_COLOR),
           "negative": ("vtkMRMLMarkupsFiducialNode", "SAM negative", NEGATIVE_COLOR),
           "box": ("vtkMRMLMarkupsROINode", "SAM box", (1.0, 0.85, 0.1)),
           "scribble": ("vtkMRMLMarkupsCurveNode", "SAM scribble", POSITIVE_COLOR),
           "negative_scribble": ("vtkMRMLMarkupsCurveNode", "SAM negative scribble", NEGATIVE_COLOR),
           "lasso": ("vtkMRMLMarkupsClosedCurveNode", "SAM lasso", POSITIVE_COLOR),
           "negative_lasso": ("vtkMRMLMarkupsClosedCurveNode", "SAM negative lasso", NEGATIVE_COLOR)}
STROKES = {"scribble": (True, False), "negative_scribble": (False, False), "lasso": (True, True),
           "negative_lasso": (False, True)}  # kind → (positive, closed)


class Host(Protocol):
    """What a front end gives the rules: its selected nodes and the views it shows."""

    volume_node: object
    segmentation_node: object
    segment_id: str
    prompts: dict  # "positive", "negative", "box" → markups node

    def slice_nodes(self) -> list:
        """The slice nodes of the views the user places prompts in."""

    def edit_target(self) -> tuple[object, Callable[[], None] | None]:
        """The Segment Editor node whose masking applies, and the function that saves an undo state (the
        editor pointed at the selected segmentation and volume)."""


@dataclass(frozen=True)
class Status:
    """The status line: a sentence, and whether it reports a failure."""

    text: str = ""
    error: bool = False


def add_prompt_nodes(scene, kinds=tuple(PROMPTS)) -> dict:
    """New markups nodes in ``scene`` for the given ``kinds`` of prompt (keys of ``PROMPTS``: the points, the box
    and the strokes; all by default)."""
    nodes = {}
    for kind in kinds:
        cls, label, color = PROMPTS[kind]
        node = mrml.add_markups_node(scene, cls, label)
        node.CreateDefaultDisplayNodes()
        node.GetDisplayNode().SetSelectedColor(*color)
        nodes[kind] = node
    return nodes


class FrontEnd:
    """The rules of the module docstring over ``controller`` (the engine-facing logic), with ``settings`` (a
    :class:`Settings`, or the desktop's parameter node, which has its fields) and ``host``."""

    def __init__(self, controller: SegmentationController, settings: Settings, host: Host) -> None:
        self.controller = controller
        self.settings = settings
        self.host = host
        self.status = Status()
        self.all_slices = False  # the next propagation goes through the whole volume
        self._sent_clicks: set[tuple[str, str]] = set()  # control points already sent as clicks in 3D
        self._seen = (controller.status, controller.status_error)
        self._suggested_at = 0  # the controller's revision the last automatic suggestion was asked for
        self._shown: dict | None = None  # the suggestion the views were last moved to

    # ---- the status line -----------------------------------------------------------------------------------
    def say(self, text: str, error: bool = False) -> None:
        if error and (text, error) != (self.status.text, self.status.error):
            logging.warning(text)  # once per message (not on every poll)
        self.status = Status(text, error)

    def begin(self) -> None:
        """A user action starts: the status line (an error too) is cleared."""
        self.status = Status()
        self._seen = (self.controller.status, self.controller.status_error)

    def act(self, action: Callable[[], object]):
        """Run one user action (:meth:`begin`); a user error becomes the status and nothing else changes.
        Returns what the action returned (None after an error)."""
        self.begin()
        try:
            return action()
        except SegmentWithSAMError as error:
            self.say(str(error), error=True)
            return None

    def poll(self) -> bool:
        """Apply what the backend sent; a new controller status is shown unless it would hide an error. Returns
        whether work is still running."""
        c = self.controller
        busy = c.poll()
        seen = (c.status, c.status_error)
        if seen != self._seen:
            self._seen = seen
            if seen[1] or not self.status.error:
                self.say(*seen)
        if self.settings.suggest_next and not busy and c.revision != self._suggested_at:
            self._suggested_at = c.revision
            try:
                busy = self.suggest() is not None
            except SegmentWithSAMError:
                pass  # nothing to suggest on (no segment, an empty one): no marker, and no error for a setting
        found = c.suggested
        if found is not None and found["ras"] is not None and found is not self._shown:
            self._shown = found
            for node in self.host.slice_nodes():  # each view through the marker, as it is oriented
                node.JumpSliceByOffsetting(*found["ras"])
        return busy

    # ---- prompts ---------------------------------------------------------------------------------------------
    def _volume(self):
        if self.host.volume_node is None:
            raise PromptError("Select a volume first.")
        return self.host.volume_node

    def prompt_view(self) -> View:
        """The view whose slice holds the prompts (the slice view they were placed in); axial without any."""
        prompts = self.host.prompts
        points, _ = mrml.ordered_clicks(prompts["positive"], prompts["negative"])
        placed = mrml.roi_corners(prompts["box"])
        anchors = points if placed is None else [*points, placed[1]]
        if not len(anchors):
            return View.AXIAL
        volume = self.controller.volume(self._volume())
        return View.parse(mrml.view_of_prompts(anchors, self.host.slice_nodes(), volume)[1])

    def corrects_in_3d(self) -> bool:
        """Whether placed points correct the selected segment in 3D: no box, and the segment has voxels."""
        host = self.host
        return mrml.roi_corners(host.prompts["box"]) is None \
            and mrml.segment_has_mask(host.segmentation_node, host.segment_id, host.volume_node)

    def prompts_changed(self) -> None:
        """The placed prompts changed (the host calls this once per burst of markups events)."""
        if self.host.volume_node is None:
            return
        if self.corrects_in_3d():
            self.act(self.send_clicks_3d)
        elif self.settings.live_preview or mrml.roi_corners(self.host.prompts["box"]) is not None:
            self.act(self.preview)

    def _window(self):
        return self.controller.window(self.host.volume_node, self.settings.model_window)

    def model_to_download(self):
        """The registry entry of the chosen model if it must be downloaded to run here (None when it is ready, or
        with a server: it has its own); ``PromptError`` if it cannot be downloaded at all."""
        return self.controller.missing_model(self.settings.model) if runs_here(self.settings) else None

    def require_model(self) -> None:
        """Use the chosen backend (``BackendError`` for a bad address, or no key: nothing changes), then
        ``PromptError`` if the chosen model must be downloaded first."""
        s = self.settings
        self.controller.use_backend(s.backend, s.server_address, s.server_cafile)
        entry = self.model_to_download()
        if entry is not None:
            raise PromptError(f"{entry.name} is not downloaded yet ({entry.size / 1e6:.0f} MB, licence "
                              f"{entry.licence}): download it first (kept only if its SHA-256 is the expected one).")

    def preview(self) -> None:
        """A mask from the placed prompts on their slice, as a step on the selected segment."""
        host, s = self.host, self.settings
        self.require_model()
        handle = self.controller.request_preview(
            self._volume(), host.prompts["positive"], host.prompts["negative"], host.prompts["box"],
            self.prompt_view(), self._window(), s.model, device_of(s), host.segmentation_node, host.segment_id)
        if handle is not None:
            self.say("Segmenting…")

    def send_clicks_3d(self) -> None:
        """Send each point placed since the last as a click in 3D on the selected segment, in click order (the
        slices it would change are the preview; Accept writes them as one step, or at once with auto accept)."""
        host, s = self.host, self.settings
        self.require_model()
        editor_node, save_state = host.edit_target()
        for position, positive in mrml.new_clicks(host.prompts["positive"], host.prompts["negative"],
                                                  self._sent_clicks):
            self.controller.click_3d(self._volume(), host.segmentation_node, host.segment_id, position, positive,
                                     window=self._window(), model=s.model, device=device_of(s),
                                     editor_node=editor_node, save_state=save_state, auto_accept=s.auto_accept)
        self.say(self.controller.status)

    def drawn_strokes(self) -> list[tuple[str, list]]:
        """Each stroke placed and not sent yet: its kind (a key of ``STROKES``) and its points (3,) RAS."""
        prompts = self.host.prompts
        return [(kind, points) for kind in STROKES if prompts.get(kind) is not None
                and len(points := [p for _, p in mrml.defined_points(prompts[kind])])]

    def send_strokes(self) -> str | None:
        """Send each placed stroke as a correction of the selected segment (the host calls this when the user
        stops placing one), then empty its node; a segmentation and a segment are made if none is selected.
        Returns the segment's ID (the host selects it), None without a stroke."""
        host, s = self.host, self.settings
        drawn = self.drawn_strokes()
        if not drawn:
            return None
        try:
            self.require_model()
            volume_node = self._volume()
            segment_id = self.controller.ensure_segment(self._segmentation(), host.segment_id, volume_node)
            editor_node, save_state = host.edit_target()
            for kind, points in drawn:
                positive, closed = STROKES[kind]
                view = None
                if not mrml.segment_has_mask(host.segmentation_node, segment_id, volume_node):
                    view = mrml.view_of_prompts(points, host.slice_nodes(), self.controller.volume(volume_node))[1]
                self.controller.stroke_3d(volume_node, host.segmentation_node, segment_id, points, positive, closed,
                                          view, self._window(), s.model, device_of(s), editor_node, save_state,
                                          s.auto_accept)
        finally:
            for kind, _ in drawn:
                host.prompts[kind].RemoveAllControlPoints()
        self.say(self.controller.status)
        return segment_id

    def _segmentation(self):
        """The selected segmentation, or a new one on the volume's geometry (the first Accept or stroke)."""
        host = self.host
        if host.segmentation_node is None:
            node = self.controller.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
            node.CreateDefaultDisplayNodes()
            node.SetReferenceImageGeometryParameterFromVolumeNode(self._volume())
            host.segmentation_node = node
        return host.segmentation_node

    def clear_prompts(self) -> None:
        """Remove every prompt, a pending 3D correction, the preview and a suggestion (the segment stays)."""
        for node in self.host.prompts.values():
            if node is not None:
                mrml.empty_prompt(node)
        self._sent_clicks.clear()
        self.controller.discard_refinement()
        self.controller.clear_preview()
        self.controller.clear_suggestion()

    # ---- finished segments ---------------------------------------------------------------------------------
    def _segment(self):
        host = self.host
        node = host.segmentation_node
        return node.GetSegmentation().GetSegment(host.segment_id) if node is not None and host.segment_id else None

    def set_finished(self, finished: bool) -> None:
        """Mark the selected segment finished (every other segment's steps keep out of it) or in progress."""
        segment = self._segment()
        if segment is None:
            raise PromptError("Select the segment to mark finished.")
        set_finished(self.host.segmentation_node, self.host.segment_id, finished)
        self.say(f"{segment.GetName()} is finished: other segments' prompts, propagation and clicks keep out of it."
                 if finished else f"{segment.GetName()} is in progress again: other segments may take its voxels.")

    # ---- where to click next -------------------------------------------------------------------------------
    def suggest(self):
        """Ask where to click next on the selected segment (the answer shows at a later poll)."""
        host, s = self.host, self.settings
        self.require_model()
        return self.controller.suggest(self._volume(), host.segmentation_node, host.segment_id, self._window(),
                                       s.model, device_of(s))

    def take_suggestion(self) -> None:
        """Place the suggested click as a prompt point: positive where the object is missing, else negative
        (the host's prompt events then send it, as any point placed there)."""
        found = self.controller.suggested
        if found is None or found["ras"] is None:
            raise PromptError("There is no suggestion to take: ask for one first.")
        self.host.prompts["positive" if found["hint"] == "add" else "negative"].AddControlPoint(*found["ras"])

    # ---- writes --------------------------------------------------------------------------------------------
    def accept(self) -> str:
        """Write the preview (or the pending 3D correction) into the selected segment (a new segmentation and
        segment if none is selected) as one undo step; returns the segment's ID. The prompts are cleared."""
        self._segmentation()  # the first Accept makes one
        editor_node, save_state = self.host.edit_target()
        segment_id = self.controller.accept(self.host.segmentation_node, self.host.segment_id, editor_node,
                                            save_state)
        self.all_slices = False
        self.clear_prompts()
        self.say(self.controller.status)
        return segment_id

    def propagation_range(self) -> tuple[int, int] | None:
        """The slices the next propagation stays in (None: the accepted box's range, else the whole volume):
        the settings' range where set (-1: the first or last slice), else the whole volume if asked."""
        s, last = self.settings, self.controller.last_accepted
        if s.range_start < 0 and s.range_end < 0 and not self.all_slices:
            return None
        view = last[2] if last else self.prompt_view()
        count = slice_axes(self.controller.volume(self._volume()), view).num_slices
        if self.all_slices and s.range_start < 0 and s.range_end < 0:
            return 0, count - 1
        return (max(s.range_start, 0), count - 1 if s.range_end < 0 else min(s.range_end, count - 1))

    def shown_range(self) -> tuple[int, int] | None:
        """The range the next propagation uses, for showing: :meth:`propagation_range`, else the accepted box's
        range on the selected segment; None where no range can be worked out yet (no volume, or prompts on no
        slice plane: the panel polls this, so it says nothing rather than raise)."""
        try:
            chosen = self.propagation_range()
        except PromptError:
            return None
        last, host = self.controller.last_accepted, self.host
        if chosen is not None or last is None or host.segmentation_node is None:
            return chosen
        same = last[:2] == (host.segmentation_node.GetID(), host.segment_id)
        return self.controller.last_accepted_range if same else None

    def propagate(self) -> None:
        """Propagate the selected segment from the slice last accepted, in the backend."""
        host, s = self.host, self.settings
        self.require_model()
        editor_node, save_state = host.edit_target()
        self.controller.propagate(self._volume(), host.segmentation_node, host.segment_id, None, None, s.direction,
                                  self.propagation_range(), stop_rules(s), self._window(), s.model, device_of(s),
                                  editor_node, save_state, s.skip)
        self.say(self.controller.status)

    def cancel(self) -> None:
        self.controller.cancel()

    def test_connection(self) -> None:
        """Check the server of the settings with the key in the background; the status line then says what it
        serves (model, device, round trip), or why it cannot be reached."""
        self.controller.test_connection(self.settings.server_address, self.settings.server_cafile)
        self.say(self.controller.status)

    # ---- what the panel shows ------------------------------------------------------------------------------
    def panel(self) -> dict:
        """What both panels show, as plain data: the status line, which buttons work now, the propagation's
        progress (done, total), where the next one starts and stays, and whether the server's fields apply."""
        c, host = self.controller, self.host
        segment = self._segment()
        server = not runs_here(self.settings)
        last, progress = c.last_accepted, c.progress
        accepted_here = last is not None and host.segmentation_node is not None \
            and last[:2] == (host.segmentation_node.GetID(), host.segment_id)
        return {
            "message": self.status.text, "error": self.status.error,
            "can_accept": c.preview_result is not None or (c.refinement is not None and c.refinement.handle is None),
            "propagating": c.propagation is not None,
            "can_propagate": c.propagation is None and accepted_here,
            "progress": [int(progress[0]), int(progress[1])] if progress else None,
            "range": list(r) if (r := self.shown_range()) else None,
            "seed": f"{last[2].value} slice {last[3]}" if last else "",
            "server": server, "can_test_connection": server and not c.backend.testing,
            "can_finish": segment is not None,
            "finished": segment is not None and is_finished(host.segmentation_node, host.segment_id),
            "suggestion": c.suggested["text"] if c.suggested else "",
            "can_take_suggestion": bool(c.suggested and c.suggested["ras"] is not None),
        }

    def close(self) -> None:
        self.controller.close()
