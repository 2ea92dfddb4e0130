"""The Python API: named objects on one volume, prompts in RAS millimetres, masks on the volume's grid.

One :class:`~.state.ObjectState` per object over :meth:`.engine.Engine.step`, as every front end uses it::

    seg = Segmenter(volume, load_model("litemedsam"), view="axial")
    seg.prompt("liver", box_ras=corners)                 # a 2D box → the mask on its slice
    seg.propagate("liver", direction="both")             # through the volume from that slice
    seg.click("liver", point_ras, positive=False)        # a correction anywhere, in 3D
    hint = seg.suggest("liver")                          # where to click next, and why
    mask = seg.mask("liver")                             # bool (K, J, I)

With ``backend=BackendClient(server="tls://gpu-host:8765", key=...)`` instead of a model, every step runs on that
backend (:mod:`.backend`) and gives the same masks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from . import actions
from .cache import EmbeddingCache
from .engine import Engine
from .errors import PromptError
from .geometry import View, Volume, slice_axes
from .propagation import StopRules
from .session import Session
from .state import ObjectState, Update, filled_slices, labelmap
from .suggest import Suggestion, suggest


class Segmenter:
    """Objects on ``view`` of ``volume`` segmented with ``model``, or by ``backend`` (a
    :class:`~.backend.client.BackendClient`); see the module docstring. ``window``: the intensity window spec
    (:func:`.preprocessing.resolve_window`); ``rules``: the stop rules where a prompt gives none (default
    :class:`~.propagation.StopRules`)."""

    def __init__(self, volume: Volume, model=None, view: View | str = View.AXIAL, window=None,
                 cache: EmbeddingCache | None = None, rules: StopRules | None = None,
                 session: Session | None = None, backend=None) -> None:
        if (model is None and session is None) == (backend is None):
            raise ValueError("A Segmenter needs a model (or a session), or a backend: one of them.")
        self.volume = volume
        self.backend, self.window, self.rules = backend, window, rules
        if backend is None:
            self.session = session if session is not None else Session(volume, model, window, cache)
            self.engine = Engine(self.session, view, rules)
            self.axes = self.engine.axes
        else:
            self.axes = slice_axes(volume, view)
        self.states: dict[str, ObjectState] = {}
        self.last_slice: dict[str, int] = {}  # per object, the slice of its latest prompt (propagate's default)

    def describe(self) -> dict:
        """The model that segments, its device and engine; in this process also ``encoded``, the images it has
        encoded so far (embeddings found in a cache are not encoded again)."""
        if self.backend is not None:
            info = self.backend.server_info
            return {"model": info.get("model"), "device": info.get("device"), "engine": info.get("engine")}
        model = self.session.model
        return {"model": model.name, "device": str(model.device), "engine": model.engine,
                "encoded": model.encoder_runs}

    def step(self, name: str, action: actions.Action, cancel: Callable[[], bool] | None = None,
             on_slice=None) -> Update:
        """Apply ``action`` to object ``name`` (kept only when it succeeds) and return what changed."""
        if self.backend is None:
            state, update = self.engine.step(self.states.get(name), action, cancel, on_slice)
        else:
            if isinstance(action, actions.Propagate) and action.rules is None and self.rules is not None:
                action = replace(action, rules=self.rules)
            handle = self.backend.step(self.volume, self.axes.view, name, self.states.get(name), action, self.window)
            state, update = self.backend.wait(handle, on_event=on_slice, cancel=cancel)
        self.states[name] = state
        if isinstance(action, (actions.Prompt, actions.Box3D, actions.Click)):
            self.last_slice[name] = action.index
        return update

    def prompt(self, name: str, points_ras=None, labels=None, box_ras=None,
               slice_range: tuple[int, int] | None = None) -> Update:
        """A 2D prompt: points (N, 3) in the order placed with ``labels`` (N,) (1 positive, 0 negative) and/or a
        box's two opposite corners (2, 3), on one slice; ``slice_range``: the box spans those slices."""
        return self.step(name, actions.prompt_from_ras(self.volume, self.axes, points_ras, labels, box_ras,
                                                       slice_range))

    def box3d(self, name: str, corners_ras, slice_range: tuple[int, int], cancel=None, skip: int = 0) -> Update:
        """A 3D box: two opposite corners (2, 3) on one slice, spanning ``slice_range`` (first, last); ``skip``:
        see :class:`~.actions.Box3D`."""
        return self.step(name, actions.box3d_from_ras(self.volume, self.axes, corners_ras, slice_range, skip),
                         cancel)

    def click(self, name: str, point_ras, positive: bool = True, cancel=None) -> Update:
        """A click anywhere in the volume correcting object ``name`` in 3D."""
        return self.step(name, actions.click_from_ras(self.volume, self.axes, point_ras, positive), cancel)

    def propagate(self, name: str, index: int | None = None, direction: str = "both",
                  slice_range: tuple[int, int] | None = None, rules: StopRules | None = None, skip: int = 0,
                  cancel=None, on_slice=None) -> Update:
        """Propagate object ``name`` from slice ``index`` (default: its latest prompt's slice)."""
        if index is None:
            if name not in self.last_slice:
                raise PromptError(f"{name!r} has no slice to propagate from: prompt it first.")
            index = self.last_slice[name]
        return self.step(name, actions.Propagate(index, direction, slice_range, rules, skip), cancel, on_slice)

    def suggest(self, name: str) -> Suggestion:
        """Where to click next on object ``name``: the place its mask looks most wrong (:mod:`.suggest`); its
        ``ras(seg.volume, seg.axes)`` is the point to click. :class:`PromptError` when it has no mask or nothing
        looks wrong."""
        if self.backend is None:
            return suggest(self.session, self.axes, self.states.get(name))
        handle = self.backend.suggest(self.volume, self.axes.view, name, self.states.get(name), self.window)
        return self.backend.wait(handle)

    def keep_out(self, name: str, mask_kji: np.ndarray) -> None:
        """Object ``name`` never takes the voxels of ``mask_kji`` (bool KJI on the volume's grid: finished
        objects, labels to keep): every mask the engine makes for it leaves them out, propagation included."""
        mask = np.asarray(mask_kji, dtype=bool)
        if mask.shape != self.volume.array.shape:
            raise PromptError(f"The voxels to keep out are {mask.shape}, not the volume's {self.volume.array.shape}.")
        keep = filled_slices(self.axes.oriented(mask))
        state = self.states.get(name)
        self.states[name] = replace(state, keep_out=keep) if state is not None else \
            ObjectState((0, self.axes.num_slices - 1), keep_out=keep)

    def mask(self, name: str) -> np.ndarray:
        """Object ``name`` as a bool KJI array on the volume's grid."""
        out = np.zeros(self.volume.array.shape, bool)
        self.axes.oriented(out)[:] = self.states[name].oriented_mask(self.axes.num_slices, self.axes.image_shape)
        return out

    def labelmap(self, names: list[str] | None = None) -> np.ndarray:
        """uint8 KJI labelmap of the objects (see :func:`.state.labelmap`)."""
        return labelmap(self.states, self.axes, self.volume.array.shape, names)
