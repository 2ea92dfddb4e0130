"""What a user can do to an object, as :func:`.engine.Engine.step` takes it: a 2D prompt on a slice, a 3D box,
a click anywhere, propagate, a user edit.

Actions are in slice pixels of the engine's view (XY = (col, row), :mod:`.geometry`). RAS prompts become
actions here only (:func:`prompt_from_ras`, :func:`box3d_from_ras`, :func:`click_from_ras`); the backend
carries them as JSON (:func:`to_message`, :func:`from_message`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Union

import numpy as np

from .errors import PromptError
from .geometry import SliceAxes, Volume, prompts_to_slice
from .propagation import Direction, StopRules
from .strokes import MIN_POINTS, check_stroke


@dataclass(frozen=True)
class Prompt:
    """A 2D prompt on slice ``index``: a ``box`` (4,) x0, y0, x1, y1 and/or ``clicks`` ((x, y, positive), …) in
    the order they were placed. Its mask replaces the slice's (a preview is this step alone). ``slice_range``
    (first, last): the box spans those slices (a 3D box drawn as a 2D box with a thickness), which its
    propagation then fills, stopping only where the model finds nothing."""

    index: int
    box: tuple[float, float, float, float] | None = None
    clicks: tuple[tuple[float, float, bool], ...] = ()
    slice_range: tuple[int, int] | None = None


@dataclass(frozen=True)
class Box3D:
    """A 3D box: the 2D box on slice ``index`` over ``slice_range`` (first, last). The same as a :class:`Prompt`
    with that box and range followed by :class:`Propagate` both ways from ``index`` with ``skip``."""

    index: int
    box: tuple[float, float, float, float]
    slice_range: tuple[int, int]
    skip: int = 0


@dataclass(frozen=True)
class Click:
    """A positive or negative click at pixel ``xy`` (col, row) on slice ``index``, correcting the object in 3D."""

    index: int
    xy: tuple[float, float]
    positive: bool


@dataclass(frozen=True)
class Scribble:
    """A positive or negative free-hand stroke on slice ``index``: ``points`` ((x, y), …) in pixels, in the order
    drawn (an open polyline). On a slice without a mask a positive one segments the object there; otherwise it
    corrects the object in 3D as clicks all along it would (:meth:`.engine.Engine.step`)."""

    index: int
    points: tuple[tuple[float, float], ...]
    positive: bool = True


@dataclass(frozen=True)
class Lasso:
    """A closed free-hand outline on slice ``index``: ``points`` ((x, y), …) in pixels (the last joins the
    first). Positive: the object on that slice is the outlined region (see ``engine.SNAP_MM``), a key slice,
    propagated through ``slice_range`` when given (as a 3D box is); negative: the region is removed from that
    slice and from what continues it on the neighbouring engine slices."""

    index: int
    points: tuple[tuple[float, float], ...]
    positive: bool = True
    slice_range: tuple[int, int] | None = None


@dataclass(frozen=True)
class Propagate:
    """Propagate from slice ``index`` (which has a mask) ``direction`` within ``slice_range`` (None: the
    object's range) by ``rules`` (None: the object's); ``skip`` slices interpolated between two the model
    segments (see :class:`~.propagation.Propagator`)."""

    index: int
    direction: str = Direction.BOTH.value
    slice_range: tuple[int, int] | None = None
    rules: StopRules | None = None
    skip: int = 0


@dataclass(frozen=True)
class UserEdit:
    """Slices the user painted outside the engine: slice → mask (rows, cols); never overwritten, they end
    propagation like key slices."""

    masks: dict[int, np.ndarray] = field(default_factory=dict)


Action = Union[Prompt, Box3D, Click, Scribble, Lasso, Propagate, UserEdit]  # noqa: UP007 - a runtime alias on 3.10
KINDS = {"prompt": Prompt, "box3d": Box3D, "click": Click, "scribble": Scribble, "lasso": Lasso,
         "propagate": Propagate, "user_edit": UserEdit}
# quick: the backend runs them before, and between the slices of, the rest
INTERACTIVE = (Prompt, Click, Scribble, Lasso, UserEdit)


def clip_box(box, image_shape: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """A box (4,) x0, y0, x1, y1 in pixels clipped to a slice of ``image_shape`` (rows, cols), and whether it
    reached past it; :class:`PromptError` for a box that is malformed or misses the slice."""
    box = np.asarray(box, dtype=float).ravel()
    if box.shape != (4,) or not np.all(np.isfinite(box)) or np.any(box[2:] < box[:2]):
        raise PromptError(f"A box is x0, y0, x1, y1 with x0 <= x1 and y0 <= y1, not {box.tolist()}.")
    rows, cols = image_shape
    if box[2] < -0.5 or box[3] < -0.5 or box[0] > cols - 0.5 or box[1] > rows - 0.5:
        raise PromptError(f"The box {np.round(box, 1).tolist()} is outside the volume (its slices are "
                          f"{cols}×{rows} pixels): draw it on the image.")
    clipped = np.clip(box, 0, [cols - 1, rows - 1, cols - 1, rows - 1])
    return clipped, not np.allclose(clipped, box)


# ---- from RAS millimetres ------------------------------------------------------------------------------------
def prompt_from_ras(volume: Volume, axes: SliceAxes, points_ras=None, labels=None, box_ras=None,
                    slice_range: tuple[int, int] | None = None) -> Prompt:
    """A :class:`Prompt` from points (N, 3) RAS in the order placed with ``labels`` (N,) (1 positive, 0
    negative; default all positive) and a box's two opposite corners (2, 3) RAS, all on one slice of ``axes``."""
    index, xy, box = prompts_to_slice(volume, axes, np.zeros((0, 3)) if points_ras is None else points_ras,
                                     box_ras)
    if box is not None:
        clip_box(box, axes.image_shape)  # a box off the image is refused now, before any model is loaded
    labels = np.ones(len(xy), int) if labels is None else np.asarray(labels, dtype=int).ravel()
    if len(labels) != len(xy):
        raise PromptError(f"{len(xy)} points need as many labels, not {len(labels)}.")
    clicks = tuple((float(x), float(y), bool(label)) for (x, y), label in zip(xy, labels, strict=True))
    return Prompt(index, None if box is None else tuple(float(v) for v in box), clicks,
                  None if slice_range is None else (int(slice_range[0]), int(slice_range[1])))


def box3d_from_ras(volume: Volume, axes: SliceAxes, corners_ras, slice_range: tuple[int, int],
                   skip: int = 0) -> Box3D:
    """A :class:`Box3D` from a box's two opposite corners (2, 3) RAS on one slice and its range of slices."""
    index, _, box = prompts_to_slice(volume, axes, np.zeros((0, 3)), corners_ras)
    clip_box(box, axes.image_shape)
    return Box3D(index, tuple(float(v) for v in box), (int(slice_range[0]), int(slice_range[1])), skip)


def click_from_ras(volume: Volume, axes: SliceAxes, point_ras, positive: bool) -> Click:
    """A :class:`Click` at a RAS point (3,) anywhere in the volume, whichever view it was placed in: on the slice
    of ``axes``' view through it."""
    point = np.asarray(point_ras, dtype=float).reshape(3)
    ijk = volume.to_ijk(point[None])[0]
    if not np.all(np.isfinite(point)) or np.any(ijk < -0.5) or np.any(ijk > np.asarray(volume.shape_ijk) - 0.5):
        raise PromptError(f"The click at R={point[0]:.1f}, A={point[1]:.1f}, S={point[2]:.1f} mm is outside the "
                          "volume: click inside it.")
    slices, xy = axes.ijk_to_pixel(ijk[None])
    return Click(int(np.rint(slices[0])), (float(np.rint(xy[0][0])), float(np.rint(xy[0][1]))), bool(positive))


def stroke_from_ras(volume: Volume, axes: SliceAxes, points_ras, positive: bool = True, closed: bool = False,
                    slice_range: tuple[int, int] | None = None) -> Scribble | Lasso:
    """A :class:`Scribble` (or, ``closed``, a :class:`Lasso` over ``slice_range``) from its points (N, 3) RAS in
    the order drawn, all on one slice of ``axes``: :class:`PromptError` for points off that slice's plane, too
    few, outside the volume, or a lasso that crosses itself."""
    points = np.asarray(points_ras, dtype=float).reshape(-1, 3)
    if len(points) < MIN_POINTS[closed]:
        raise PromptError(f"A {'lasso' if closed else 'scribble'} needs at least {MIN_POINTS[closed]} points, "
                          f"not {len(points)}.")
    index, xy, _ = prompts_to_slice(volume, axes, points)
    xy = check_stroke(xy, axes.image_shape, closed)
    pairs = tuple((float(x), float(y)) for x, y in xy)
    if closed:
        return Lasso(index, pairs, bool(positive), None if slice_range is None else
                     (int(slice_range[0]), int(slice_range[1])))
    return Scribble(index, pairs, bool(positive))


def parse_slice_range(text: str | None, what: str = "--range") -> tuple[int, int] | None:
    """``"A:B"`` → (A, B), slice numbers along the view's slice axis; None for None."""
    if text is None:
        return None
    try:
        low, high = (int(v) for v in text.split(":"))
    except ValueError:
        raise PromptError(f"{what} needs A:B with two slice numbers, not {text!r}.") from None
    return low, high


# ---- the backend's wire format -------------------------------------------------------------------------------
def to_message(action: Action) -> tuple[dict, dict[str, np.ndarray]]:
    """``action`` as a JSON-able header (``type`` + its fields) and arrays (a user edit's masks)."""
    kind = next(name for name, cls in KINDS.items() if isinstance(action, cls))
    if isinstance(action, UserEdit):
        return {"type": kind, "slices": sorted(int(i) for i in action.masks)}, \
            {f"edit/{int(i)}": np.asarray(m, bool) for i, m in action.masks.items()}
    return {"type": kind, **asdict(action)}, {}


def _box(value) -> tuple[float, ...] | None:
    if value is not None and len(value) != 4:
        raise ValueError(f"a box is x0, y0, x1, y1, not {value!r}")
    return None if value is None else tuple(float(v) for v in value)


_READ = {  # each field's value as JSON gives it → as the action holds it
    "index": int, "box": _box, "positive": bool, "skip": lambda v: v,  # (the propagator checks skip)
    "xy": lambda v: tuple(float(c) for c in v[:2]),
    "clicks": lambda v: tuple((float(x), float(y), bool(p)) for x, y, p in v),
    "points": lambda v: tuple((float(x), float(y)) for x, y in v),
    "slice_range": lambda v: None if v is None else (int(v[0]), int(v[1])),
    "direction": lambda v: Direction(v).value,
    "rules": lambda v: None if v is None else StopRules(**v),
}


def from_message(header, arrays: dict[str, np.ndarray]) -> Action:
    """The action :func:`to_message` wrote; anything malformed raises :class:`PromptError` saying what."""
    if not isinstance(header, dict) or header.get("type") not in KINDS:
        raise PromptError(f"An action needs a type, one of {', '.join(KINDS)}; got {header!r:.80}.")
    kind = KINDS[header["type"]]
    try:
        if kind is UserEdit:
            return UserEdit({int(i): np.asarray(arrays[f"edit/{int(i)}"], bool) for i in header["slices"]})
        return kind(**{f.name: _READ[f.name](header[f.name]) for f in fields(kind) if f.name in header})
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise PromptError(f"The {header['type']} action is malformed: {type(error).__name__}: {error}.") from None
