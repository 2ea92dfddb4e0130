"""The SAM workflow of the web app on one trame-slicer ``SlicerApp``, without any page: volumes in, prompts
placed with Slicer's markups, previews, accept, undo/redo, propagation and saving.

Everything that decides what is written lives in :class:`~SegmentWithSAMSlicerLib.logic.SegmentationController`
(the desktop module's rules); this class only holds the web app's nodes, routes its buttons to the controller
and reports what the page shows (:meth:`WebWorkflow.snapshot`). It never blocks: :meth:`WebWorkflow.poll` is
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

from SegmentWithSAMLib.errors import PromptError, SegmentWithSAMError
from SegmentWithSAMLib.geometry import View, Volume, slice_axes
from SegmentWithSAMLib.io import SEGMENTATION_SUFFIX, write_labelmap
from SegmentWithSAMLib.models import DEFAULT_MODEL
from SegmentWithSAMLib.preprocessing import CT_PRESETS
from SegmentWithSAMSlicerLib import mrml
from SegmentWithSAMSlicerLib.logic import SegmentationController
from SegmentWithSAMSlicerLib.prompt_watch import PromptWatcher

from .host import PlaceMode, UndoSeam, bind_slicer_util

PROMPTS = {"positive": ("vtkMRMLMarkupsFiducialNode", "SAM positive", (0.2, 0.9, 0.2)),
           "negative": ("vtkMRMLMarkupsFiducialNode", "SAM negative", (0.95, 0.2, 0.2)),
           "box": ("vtkMRMLMarkupsROINode", "SAM box", (1.0, 0.85, 0.1))}
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


@dataclass
class Settings:
    """What the page's selectors choose (model from the registry, device, the model's intensity window)."""

    model: str = DEFAULT_MODEL
    device: str = "auto"
    window: str = "display"
    direction: str = "both"
    skip: int = 0
    auto_accept: bool = False  # write each 3D click's correction at once (else on Accept)


class WebWorkflow:
    """The web app's SAM workflow on ``slicer_app`` (see the module docstring). ``client_factory(model,
    device)`` makes the backend client, as for the desktop controller."""

    def __init__(self, slicer_app, client_factory=None, *, multisamples: int = 0) -> None:
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
        self.settings = Settings()
        self.volume_node = None
        self.volume_name = ""
        self.prompts: dict[str, object] = {}
        self.own_window: tuple[float, float] | None = None  # the volume's display window when it was loaded
        self.placing: str | None = None
        self.all_slices = False  # propagate through the whole volume, not the accepted box's range
        self.message = ""
        self.watcher = PromptWatcher(self._on_prompts_changed)
        self._sent_clicks: set[tuple[str, str]] = set()  # control points already sent as clicks in 3D
        self._prompts_changed = False
        self._status_handle = None
        self._status_asked = 0.0
        self.backend_info: dict = {}

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
        bounds = [0.0] * 6
        node.GetRASBounds(bounds)
        for view in views.get_threed_views():  # the segments' surfaces appear within the volume's bounds
            view.renderer().ResetCamera(bounds)
            view.schedule_render()
        segmentation = self.editor.create_empty_segmentation_node()
        segmentation.SetName(f"{name} segmentation")
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(node)
        segmentation.GetSegmentation().AddEmptySegment("", "Segment_1", (0.9, 0.3, 0.2))
        self.editor.set_active_segmentation(segmentation, node)
        self.editor.set_surface_representation_enabled(True)
        for kind, (cls, label, color) in PROMPTS.items():
            prompt = self.scene.AddNewNodeByClass(cls, label)
            prompt.CreateDefaultDisplayNodes()
            prompt.GetDisplayNode().SetSelectedColor(*color)
            self.prompts[kind] = prompt
        self.watcher.watch(list(self.prompts.values()))
        self.all_slices = False
        self.message = f"Loaded {name}: place a box or points in any slice view."

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
        self.message = f"Opened {path.name}: {node.GetSegmentation().GetNumberOfSegments()} segment(s)."

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
        """Start placing ``kind`` ("positive", "negative" or "box") in the slice views, or stop (None). A new
        box replaces the old one."""
        if kind is None:
            self.place_mode.stop()
            self.placing = None
            return
        node = self.prompts.get(kind) if self.volume_node is not None else None
        if node is None:
            raise PromptError("Open a volume first, then place prompts on it.")
        if kind == "box":
            node.RemoveAllControlPoints()
        self.place_mode.start(node, persistent=kind != "box")
        self.placing = kind

    def clear_prompts(self) -> None:
        """Remove every prompt, a pending 3D correction and the preview (the segment stays as it is)."""
        with self.watcher.paused():  # one step: no preview of the prompts left while removing node by node
            for node in self.prompts.values():
                node.RemoveAllControlPoints()
        self._sent_clicks.clear()
        self.controller.discard_refinement()
        self.controller.clear_preview()

    def _on_prompts_changed(self) -> None:
        self._prompts_changed = True  # acted on at the next poll: one request per burst of events

    def _on_new_prompts(self) -> None:
        """As the desktop module: points on a segment that has voxels correct it in 3D; any other prompts (or a
        box) give a 2D preview on the slice they lie on."""
        self._prompts_changed = False
        if self.volume_node is None:
            return
        segment_id = self.editor.active_segment_id
        if mrml.roi_corners(self.prompts["box"]) is None \
                and mrml.segment_has_mask(self.segmentation_node, segment_id, self.volume_node):
            self.send_clicks_3d()
            return
        p = self.prompts
        handle = self.controller.request_preview(
            self.volume_node, p["positive"], p["negative"], p["box"], self.prompt_view(),
            self.controller.window(self.volume_node, self.settings.window), self.settings.model, self._device(),
            self.segmentation_node, segment_id)
        if handle is not None:
            self.message = "Segmenting…"

    def send_clicks_3d(self) -> None:
        """Send each point placed since the last as a click in 3D on the active segment, in click order (the
        controller shows the slices it would change as the preview; Accept writes them as one step)."""
        s = self.settings
        for position, is_positive in mrml.new_clicks(self.prompts["positive"], self.prompts["negative"],
                                                     self._sent_clicks):
            self.controller.click_3d(self.volume_node, self.segmentation_node, self.editor.active_segment_id,
                                     position, is_positive, window=self.controller.window(self.volume_node, s.window),
                                     model=s.model, device=self._device(), editor_node=self.editor.editor_node,
                                     save_state=self.undo_seam.save_state, auto_accept=s.auto_accept)
        self.message = self.controller.status

    def prompt_view(self) -> View:
        """The view whose slice holds the prompts (the slice view they were placed in)."""
        volume = self.controller.volume(self.volume_node)
        points, _ = mrml.ordered_clicks(self.prompts["positive"], self.prompts["negative"])
        placed = mrml.roi_corners(self.prompts["box"])
        anchors = points if placed is None else [*points, placed[1]]
        if not len(anchors):
            return View.AXIAL
        slice_nodes = [view.get_view_node() for view in self.app.view_manager.get_slice_views()]
        return mrml.view_of_prompts(anchors, slice_nodes, volume)[1]

    def _device(self) -> str | None:
        return None if self.settings.device == "auto" else self.settings.device

    # ---- segment writes (each one undo step) ---------------------------------------------------------------
    def accept(self) -> str:
        """Write the preview (or the pending 3D correction) into the active segment as one undo step; a box that
        spans slices sets the propagation range (the controller keeps it). Returns the segment ID."""
        self._require_volume()
        segment_id = self.controller.accept(self.segmentation_node, self.editor.active_segment_id,
                                            self.editor.editor_node, self.undo_seam.save_state)
        self.undo_seam.commit()
        self.editor.set_active_segment_id(segment_id)
        self.all_slices = False
        self.clear_prompts()
        self.message = self.controller.status
        return segment_id

    def undo(self) -> None:
        self.undo_stack.undo()

    def redo(self) -> None:
        self.undo_stack.redo()

    def propagation_range(self) -> tuple[int, int] | None:
        """The slices the next propagation stays in: the accepted box's extent across slices (None: all)."""
        c = self.controller
        last = c.last_accepted
        if self.all_slices or last is None or self.segmentation_node is None:
            return None
        return c.last_accepted_range if last[:2] == (self.segmentation_node.GetID(), self.editor.active_segment_id) \
            else None

    def propagate(self) -> None:
        """Propagate the active segment from the slice last accepted, within the range, in the backend."""
        volume_node = self._require_volume()
        s = self.settings
        whole = None
        if self.all_slices and self.controller.last_accepted is not None:
            view = self.controller.last_accepted[2]
            whole = (0, slice_axes(self.controller.volume(volume_node), view).num_slices - 1)
        self.controller.propagate(volume_node, self.segmentation_node, self.editor.active_segment_id,
                                  direction=s.direction, slice_range=whole,
                                  window=self.controller.window(volume_node, s.window), model=s.model,
                                  device=self._device(), editor_node=self.editor.editor_node,
                                  save_state=self.undo_seam.save_state, skip=s.skip)
        self.message = self.controller.status

    def cancel(self) -> None:
        self.controller.cancel()

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
                 "visible": bool(self.editor.get_segment_visibility(segment_id))}
                for segment_id, p in self.editor.get_all_segment_properties().items()]

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
        stack and ask for the backend's state now and then. Never blocks; user errors become ``message``."""
        try:
            if self._prompts_changed:
                self._on_new_prompts()
        except SegmentWithSAMError as error:
            self.message = str(error)
        before = self.controller.status
        self.controller.poll()
        if self.undo_seam.commit() or self.controller.status != before:
            self.message = self.controller.status
        self._poll_backend_state()

    def _poll_backend_state(self) -> None:
        client = self.controller.client
        if client is None or not client.running:
            return
        handle = self._status_handle
        if handle is not None and handle.done:
            self.backend_info = handle.result if handle.state == "done" else {}
            self._status_handle = None
        if self._status_handle is None and time.monotonic() - self._status_asked > STATUS_EVERY_S:
            self._status_handle, self._status_asked = client.status(), time.monotonic()

    def backend_state(self) -> str:
        """What the backend is doing, in words: not started, loading the model, working, ready, restarted."""
        client, c = self.controller.client, self.controller
        if c.download is not None:
            return "downloading the model"
        if client is None:
            return "not started (starts with the first prompt)"
        if not client.running:
            return "stopped: the next request starts a fresh backend" if client.restarts else "starting"
        info = self.backend_info
        restarted = f", restarted {client.restarts}×" if client.restarts else ""
        if not info.get("model"):
            return f"loading the model{restarted}"
        if c.propagation is not None:
            return f"propagating{restarted}"
        if c.refinement is not None and c.refinement.handle is not None:
            return f"correcting in 3D{restarted}"
        if c.preview_handle is not None:
            return f"segmenting (encoding a new slice takes longest){restarted}"
        return f"ready: {info['model']} on {info.get('device')} ({info.get('engine')}){restarted}"

    def snapshot(self) -> dict:
        """What the page shows, as plain data (the app copies it into the trame state when it changed)."""
        c = self.controller
        last = c.last_accepted
        progress = c.progress
        return {
            "volume_name": self.volume_name if self.volume_node is not None else "",
            "message": self.message, "backend": self.backend_state(), "placing": self.placing,
            "can_accept": c.preview_result is not None or (c.refinement is not None and c.refinement.handle is None),
            "propagating": c.propagation is not None,
            "progress": [int(progress[0]), int(progress[1])] if progress else None,
            "can_undo": self.undo_stack.can_undo(), "can_redo": self.undo_stack.can_redo(),
            "can_propagate": c.propagation is None and last is not None and self.segmentation_node is not None
            and last[:2] == (self.segmentation_node.GetID(), self.editor.active_segment_id),
            "range": list(r) if (r := self.propagation_range()) else None,
            "seed": f"{last[2].value} slice {last[3]}" if last else "",
            "segments": self.segments() if self.volume_node is not None else [],
            "active_segment": self.editor.active_segment_id, "segment_name": self._segment_name(),
        }

    def close(self) -> None:
        self.controller.close()
