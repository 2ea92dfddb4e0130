"""The SAM workflow of the web app on one trame-slicer ``SlicerApp``, without any page: volumes in, prompts
placed with Slicer's markups, previews, accept, undo/redo, propagation and saving.

The rules are the desktop module's: :class:`~SegmentWithSAMSlicerLib.front_end.FrontEnd` (which prompts do what,
the view, the range, the status line) over :class:`~SegmentWithSAMSlicerLib.logic.SegmentationController` (what
is written), with one :class:`~SegmentWithSAMSlicerLib.settings.Settings`. This class is their :class:`Host`: it
holds the web app's nodes, routes the page's buttons and reports what the page shows
(:meth:`WebWorkflow.snapshot`). It never blocks: :meth:`WebWorkflow.poll` is
called from the trame server's event loop and only picks up what the backend process has sent.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import slicer
from trame_slicer.core.volume_window_level import VolumeWindowLevel
from trame_slicer.segmentation import SegmentProperties
from undo_stack import UndoStack

from SegmentWithSAMLib.errors import PromptError
from SegmentWithSAMLib.geometry import Volume
from SegmentWithSAMLib.io import SEGMENTATION_SUFFIX, write_labelmap
from SegmentWithSAMLib.preprocessing import CT_PRESETS
from SegmentWithSAMSlicerLib import mrml
from SegmentWithSAMSlicerLib.backend_choice import Server
from SegmentWithSAMSlicerLib.finished import is_finished
from SegmentWithSAMSlicerLib.front_end import STROKES, FrontEnd, add_prompt_nodes
from SegmentWithSAMSlicerLib.logic import SegmentationController
from SegmentWithSAMSlicerLib.prompt_watch import PromptWatcher
from SegmentWithSAMSlicerLib.settings import Settings

from .host import PlaceMode, UndoSeam, bind_slicer_util
from .threed import center_on_segment, show_volume_in_3d

STATUS_EVERY_S = 1.0  # how often the backend's state (model loaded, device) is asked for while it runs
UNDO_LIMIT = 20  # each step holds two copies of the segmentation
DOWNLOAD_SUFFIXES = (SEGMENTATION_SUFFIX, ".nii.gz", ".nrrd")


@dataclass
class SegmentExport:
    """One segment as a KJI mask on its volume's grid, with its name and colour (RGB 0..1); its writes touch no
    MRML, so they may run on a worker thread."""

    mask: np.ndarray
    volume: Volume
    name: str
    color: tuple[float, float, float]

    def write(self, path: Path) -> int:
        """Write it to ``path`` (.seg.nrrd through slicerio, or a NIfTI/NRRD labelmap); returns its voxel count."""
        write_labelmap(self.mask, self.volume, path, name=self.name, color=self.color)
        return int(self.mask.sum())

    def to_bytes(self, suffix: str) -> tuple[str, bytes]:
        """A file's name and bytes (for a download), written through a private temporary folder."""
        if suffix not in DOWNLOAD_SUFFIXES:
            raise PromptError(f"Download as {', '.join(DOWNLOAD_SUFFIXES)}, not {suffix!r}.")
        with tempfile.TemporaryDirectory(prefix="segmentwithsam-download-") as folder:
            path = Path(folder) / f"{self.name}{suffix}"
            self.write(path)
            return path.name, path.read_bytes()


class WebWorkflow:
    """The web app's SAM workflow on ``slicer_app`` (see the module docstring). ``client_factory(model,
    device)`` makes the backend client on this computer, as for the desktop controller; with ``server`` (a
    :class:`~SegmentWithSAMSlicerLib.backend_choice.Server`) the model runs there instead, for the workflow's
    life, and the workflow connects at its first poll."""

    def __init__(self, slicer_app, client_factory=None, *, multisamples: int = 0,
                 server: Server | None = None) -> None:
        bind_slicer_util(slicer_app)
        self.app = slicer_app
        self.scene = slicer_app.scene
        self.editor = slicer_app.segmentation_editor
        self.controller = SegmentationController(self.scene, client_factory)
        self.undo_stack = UndoStack(undo_limit=UNDO_LIMIT)
        self.editor.set_undo_stack(self.undo_stack)
        self.undo_seam = UndoSeam(self.editor, self.undo_stack)
        self.place_mode = PlaceMode(slicer_app.markups_logic)
        self.multisamples = multisamples
        self.volume_node = None
        self.volume_name = ""
        self.prompts: dict[str, object] = {}
        self.own_window: tuple[float, float] | None = None  # the volume's display window when it was loaded
        self.placing: str | None = None
        self.front = FrontEnd(self.controller, Settings(), self)
        self.watcher = PromptWatcher(self._on_prompts_changed)
        self._prompts_changed = False
        self._status_handle = None
        self._status_asked = 0.0
        self.backend_info: dict = {}
        self._closed = False
        if server is not None:  # the operator's choice; the app never binds these settings to the page
            s = self.settings
            self.controller.backend.key = server.key
            s.backend, s.server_address, s.server_cafile = "server", server.address, server.cafile or ""
            self.controller.use_backend(s.backend, s.server_address, s.server_cafile)

    @property
    def settings(self) -> Settings:
        return self.front.settings

    @property
    def message(self) -> str:
        return self.front.status.text

    # ---- the Host of the front-end rules -------------------------------------------------------------------
    @property
    def segment_id(self) -> str:
        return self.editor.active_segment_id

    def slice_nodes(self) -> list:
        return [view.get_view_node() for view in self.app.view_manager.get_slice_views()]

    def edit_target(self):
        return self.editor.editor_node, self.undo_seam.save_state

    # ---- volumes -------------------------------------------------------------------------------------------
    def load_volume(self, volume: Volume, name: str) -> None:
        """Show ``volume`` (already read and checked by the core) with an empty segmentation and fresh prompts,
        replacing what was loaded before."""
        self.close_volume()
        node = slicer.util.addVolumeFromArray(volume.array, volume.ijk_to_ras, name)
        display = node.GetDisplayNode()
        self.own_window = (display.GetWindow(), display.GetLevel())
        self.volume_node, self.volume_name = node, name
        manager = self.app.display_manager
        manager.show_volume_in_slice_background(node)
        manager.show_volume_in_slice_foreground(None)
        views = self.app.view_manager
        for view in views.get_views():
            view.render_window().SetMultiSamples(self.multisamples)
        manager.reset_views()
        show_volume_in_3d(views, node)
        segmentation = self.editor.create_empty_segmentation_node()
        segmentation.SetName(f"{name} segmentation")
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(node)
        segmentation.GetSegmentation().AddEmptySegment("", "Segment_1", (0.9, 0.3, 0.2))
        self.editor.set_active_segmentation(segmentation, node)
        self.editor.set_surface_representation_enabled(True)
        self.prompts = add_prompt_nodes(self.scene)
        self.watcher.watch([self.prompts[kind] for kind in ("positive", "negative", "box")])  # strokes: on placing
        self.front.all_slices = False
        self.front.say(f"Loaded {name}: place a box or points in any slice view.")

    def close_volume(self) -> None:
        """Remove the loaded volume, its segmentation and the prompts from the scene."""
        self.controller.cancel()
        self.controller.discard_refinement()
        self.controller.clear_preview()
        self.watcher.close()
        self.place(None)
        segmentation = self.segmentation_node
        for node in (*self.prompts.values(), segmentation, self.volume_node):
            if node is not None and node.GetScene() is not None:
                self.scene.RemoveNode(node)
        self.prompts, self.volume_node = {}, None
        self.undo_stack.clear()

    def load_segmentation(self, path: Path) -> None:
        """Open a segmentation file (e.g. a saved .seg.nrrd) on the loaded volume as the segmentation to edit."""
        volume_node = self._require_volume()
        node = self.app.io_manager.load_segmentation(path)
        if node is None or node.GetSegmentation().GetNumberOfSegments() == 0:
            if node is not None:
                self.scene.RemoveNode(node)
            raise PromptError(f"{path.name} holds no segment that could be read.")
        node.SetName(path.name.removesuffix(SEGMENTATION_SUFFIX))
        old = self.segmentation_node
        self.editor.set_active_segmentation(node, volume_node)
        self.editor.set_surface_representation_enabled(True)
        if old is not None:
            self.scene.RemoveNode(old)
        self.front.say(f"Opened {path.name}: {node.GetSegmentation().GetNumberOfSegments()} segment(s).")

    @property
    def segmentation_node(self):
        return self.editor.active_segmentation_node

    def _require_volume(self):
        if self.volume_node is None:
            raise PromptError("Open a volume first (the Colin27 sample, a file on the server, or an upload).")
        return self.volume_node

    def set_display_window(self, preset: str) -> None:
        """Window/level of the slice views: "volume" (the volume's own, as loaded) or a CT preset name."""
        node = self._require_volume()
        if preset == "volume":
            width, level = self.own_window
        elif preset in CT_PRESETS:
            width, level = CT_PRESETS[preset]
        else:
            raise PromptError(f"Unknown window {preset!r}: use 'volume' or one of {', '.join(CT_PRESETS)}.")
        VolumeWindowLevel.set_volume_node_window_level(node, width, level)

    # ---- prompts and preview -------------------------------------------------------------------------------
    def place(self, kind: str | None) -> None:
        """Start placing ``kind`` (a key of ``PROMPTS``: points, a box, a scribble or a lasso) in the slice views,
        or stop (None). A new box replaces the old one; a stroke is sent when its placing stops."""
        ended, self.placing = self.placing, None
        self.place_mode.stop()
        if ended in STROKES and ended != kind:
            segment_id = self.front.send_strokes()
            if segment_id:
                self.editor.set_active_segment_id(segment_id)
        if kind is None:
            return
        node = self.prompts.get(kind) if self.volume_node is not None else None
        if node is None:
            raise PromptError("Open a volume first, then place prompts on it.")
        if kind == "box" or kind in STROKES:
            mrml.empty_prompt(node)
        self.place_mode.start(node, persistent=kind != "box")
        self.placing = kind

    def clear_prompts(self) -> None:
        """Remove every prompt, a pending 3D correction and the preview (the segment stays as it is)."""
        with self.watcher.paused():  # one step: no preview of the prompts left while removing node by node
            self.front.clear_prompts()

    def _on_prompts_changed(self) -> None:
        self._prompts_changed = True  # acted on at the next poll: one request per burst of events

    # ---- segment writes (each one undo step) ---------------------------------------------------------------
    def accept(self) -> str:
        """Write the preview (or the pending 3D correction) into the active segment as one undo step (see
        :meth:`FrontEnd.accept`). Returns the segment ID."""
        self._require_volume()
        with self.watcher.paused():
            segment_id = self.front.accept()
        self.undo_seam.commit()
        self.editor.set_active_segment_id(segment_id)
        self.center_3d()
        return segment_id

    def undo(self) -> None:
        self.undo_stack.undo()
        self.front.say("Undid the last change (Redo brings it back).")
        self.center_3d()

    def redo(self) -> None:
        self.undo_stack.redo()
        self.front.say("Redid the change.")
        self.center_3d()

    def center_3d(self) -> None:
        """After a write: the 3D view centred on the active segment (see :func:`~.threed.center_on_segment`)."""
        center_on_segment(self.app.view_manager, self.segmentation_node, self.segment_id, self.volume_node)

    def propagate(self) -> None:
        self._require_volume()
        self.front.propagate()

    def cancel(self) -> None:
        self.front.cancel()

    # ---- segments ------------------------------------------------------------------------------------------
    def add_segment(self) -> str:
        self._require_volume()
        count = self.editor.n_segments + 1
        return self.editor.add_empty_segment(segment_name=f"Segment_{count}")

    def set_segment(self, segment_id: str, name: str | None = None, color_hex: str | None = None) -> None:
        """Rename or recolour a segment (one undo step)."""
        properties = self.editor.get_segment_properties(segment_id)
        if properties is None:
            return
        properties = SegmentProperties(**{**properties.__dict__})
        if name is not None and name.strip():
            properties.name = name.strip()
        if color_hex:
            properties.color_hex = color_hex
        self.editor.set_segment_properties(segment_id, properties)

    def segments(self) -> list[dict]:
        return [{"id": segment_id, "name": p.name, "color": p.color_hex,
                 "visible": bool(self.editor.get_segment_visibility(segment_id)),
                 "finished": is_finished(self.segmentation_node, segment_id)}
                for segment_id, p in self.editor.get_all_segment_properties().items()]

    def toggle_finished(self, segment_id: str) -> None:
        """Mark a segment finished, or in progress again (the shared rule: :meth:`FrontEnd.set_finished`)."""
        self.editor.set_active_segment_id(segment_id)
        self.front.set_finished(not is_finished(self.segmentation_node, segment_id))

    # ---- saving --------------------------------------------------------------------------------------------
    def export(self) -> SegmentExport:
        """The active segment, ready to be written away from the event loop (see :class:`SegmentExport`)."""
        volume_node = self._require_volume()
        segment_id = self.editor.active_segment_id
        if not segment_id:
            raise PromptError("Select a segment to save.")
        properties = self.editor.get_segment_properties(segment_id)
        return SegmentExport(mrml.segment_array(self.segmentation_node, segment_id, volume_node),
                             self.controller.volume(volume_node), properties.name, tuple(properties.color))

    def _segment_name(self) -> str:
        properties = self.editor.get_segment_properties(self.editor.active_segment_id)
        return properties.name if properties else "segment"

    # ---- polling -------------------------------------------------------------------------------------------
    def poll(self) -> None:
        """Send a preview for new prompts, apply what the backend sent, push completed writes onto the undo
        stack and ask for the backend's state now and then. Never blocks; user errors go to the status line."""
        if self._prompts_changed:
            self._prompts_changed = False
            self.front.prompts_changed()
        self.front.poll()
        if self.undo_seam.commit():
            self.center_3d()
        self._poll_backend_state()

    def _poll_backend_state(self) -> None:
        c = self.controller
        if c.client is None and c.backend.server is not None and not self._closed:
            # a server: connect now, so that the page says what it serves before the first prompt
            self._status_handle, self._status_asked = c.engine().status(), time.monotonic()
        client = c.client
        if client is None or not client.running:
            self.backend_info, self._status_handle = {}, None  # asked again once it runs (again)
            return
        handle = self._status_handle
        if handle is not None and handle.done:
            self.backend_info = handle.result if handle.state == "done" else {}
            self._status_handle = None
        if self._status_handle is None and time.monotonic() - self._status_asked > STATUS_EVERY_S:
            self._status_handle, self._status_asked = client.status(), time.monotonic()

    def backend_state(self) -> str:
        """Where the model runs ("this computer", or "server tls://HOST:PORT") and what it is doing, in words:
        not started or connecting, loading the model, the model and device with working or ready, stopped or
        the connection lost (reconnecting, or why not), and how often it was restarted or reconnected."""
        server = self.controller.backend.server
        where = "this computer" if server is None else f"server {server.address}"
        return f"{where} · {self._backend_activity(server is not None)}"

    def _backend_activity(self, remote: bool) -> str:
        client, c = self.controller.client, self.controller
        if c.download is not None:
            return "downloading the model"
        if client is None:
            return "connecting…" if remote else "not started (starts with the first prompt)"
        if not client.running:
            if not remote:
                return "stopped: the next request starts a fresh backend" if client.restarts else "starting"
            why = client.last_failure or "Not connected yet."
            return f"{why} {'Reconnecting…' if client.reconnecting else 'The next prompt connects again.'}"
        again = f" · {'reconnected' if remote else 'restarted'} {client.restarts}×" if client.restarts else ""
        info = self.backend_info
        if not info:
            return f"{'reconnecting' if client.restarts else 'connecting'}…" if remote else f"loading the model{again}"
        if info.get("model_error"):
            return f"the model could not be loaded: {info['model_error']}"
        if info.get("device") == "loading":
            return f"loading {info.get('model')}{again}"
        if c.propagation is not None:
            doing = "propagating"
        elif c.refinement is not None and c.refinement.handle is not None:
            doing = "correcting in 3D"
        elif c.preview_handle is not None:
            doing = "segmenting (encoding a new slice takes longest)"
        else:
            doing = "ready"
        return f"{info.get('model')} on {info.get('device')} ({info.get('engine')}) · {doing}{again}"

    def snapshot(self) -> dict:
        """What the page shows, as plain data (the app copies it into the trame state when it changed)."""
        return {
            **self.front.panel(),
            "volume_name": self.volume_name if self.volume_node is not None else "",
            "backend": self.backend_state(), "placing": self.placing,
            "can_undo": self.undo_stack.can_undo(), "can_redo": self.undo_stack.can_redo(),
            "segments": self.segments() if self.volume_node is not None else [],
            "active_segment": self.editor.active_segment_id, "segment_name": self._segment_name(),
        }

    def close(self) -> None:
        self._closed = True
        self.front.close()
