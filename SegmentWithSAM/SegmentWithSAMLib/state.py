"""The state of one object on one view: what :func:`.engine.Engine.step` reads and returns.

Masks are (rows, cols) bool slices of the view in display orientation (:class:`~.geometry.SliceAxes`); pixel XY
is (col, row). A state is never changed in place by the engine: a step returns a new one that shares the masks
of the slices it did not change, so :meth:`ObjectState.changed_since` finds a step's changes by identity and
:meth:`ObjectState.to_message` can send only those (the backend's click costs what it changes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import Enum

import numpy as np
from scipy import ndimage as ndi

from .errors import PromptError
from .propagation import MAX_SKIP, StopRules


class Kind(str, Enum):
    """Who wrote a slice's mask: the engine (propagation, replaceable), a key slice (a prompt or clicks), or the
    user (edited outside the engine). Key and user slices are never overwritten by propagation."""

    ENGINE = "engine"
    KEY = "key"
    USER = "user"


@dataclass
class ObjectState:
    """One object on the engine's view. ``masks`` maps slice → mask (rows, cols) for every slice with a kind (a
    key slice may be empty: the object ends there); ``clicks`` slice → [(x, y, positive)] of 3D clicks;
    ``base`` slice → that slice's mask before its first click (None if it had none); ``offset`` (4,) the box
    minus the bounding box of its mask on the box's slice (zeros without a box); ``box`` (slice, (x0, y0, x1,
    y1)) of the latest box prompt; ``rules`` the stop rules of its propagations (None: the engine's); ``skip``
    the slices interpolated between two the model segments in its latest propagation, which its clicks' walks
    keep (:class:`~.propagation.Propagator`); ``keep_out`` slice → mask (rows, cols) of the pixels the object
    never takes (finished, locked segments: the caller sets it, the engine only reads it; a new dict when it
    changes, never edited in place)."""

    slice_range: tuple[int, int]
    masks: dict[int, np.ndarray] = field(default_factory=dict)
    kinds: dict[int, Kind] = field(default_factory=dict)
    clicks: dict[int, list[tuple[float, float, bool]]] = field(default_factory=dict)
    base: dict[int, np.ndarray | None] = field(default_factory=dict)
    offset: np.ndarray = field(default_factory=lambda: np.zeros(4))
    box: tuple[int, np.ndarray] | None = None
    rules: StopRules | None = None
    skip: int = 0
    keep_out: dict[int, np.ndarray] = field(default_factory=dict)

    def copy(self) -> ObjectState:
        """A copy whose dicts are its own (the masks are shared: steps replace masks, never edit them)."""
        return replace(self, masks=dict(self.masks), kinds=dict(self.kinds), clicks=dict(self.clicks),
                       base=dict(self.base))

    def slices(self) -> set[int]:
        """Every slice this state says something about."""
        return set(self.kinds) | set(self.clicks) | set(self.base)

    def changed_since(self, old: ObjectState | None) -> set[int]:
        """The slices whose mask, kind, clicks or base differ from ``old`` (by identity for arrays)."""
        if old is None:
            return self.slices()
        return {i for i in self.slices() | old.slices()
                if self.masks.get(i) is not old.masks.get(i) or self.kinds.get(i) != old.kinds.get(i)
                or self.clicks.get(i) != old.clicks.get(i) or self.base.get(i, 0) is not old.base.get(i, 0)}

    def oriented_mask(self, num_slices: int, image_shape: tuple[int, int]) -> np.ndarray:
        """The object as (slice, rows, cols) bool in the view's orientation."""
        out = np.zeros((num_slices, *image_shape), bool)
        for index, mask in self.masks.items():
            out[index] = mask
        return out

    # ---- the backend's wire format (a JSON header and named arrays; no pickle) -----------------------------
    def to_message(self, slices=None) -> tuple[dict, dict[str, np.ndarray]]:
        """The state's scalars and the given ``slices`` (None: all) as a JSON-able header and arrays
        (``mask/<slice>``, ``base/<slice>``, ``keep/<slice>``: the masks' bits, packed): with ``changed_since`` a
        step's delta (a step never changes ``keep_out``: it goes with the whole state only), else the whole state.
        A slice that lost everything is sent as ``null`` and removed where the message is applied."""
        per_slice, arrays = {}, {}
        for i in sorted(self.slices() if slices is None else slices):
            if i not in self.kinds and i not in self.clicks and i not in self.base:
                per_slice[str(i)] = None
                continue
            entry: dict = {"kind": self.kinds[i].value if i in self.kinds else None}
            if i in self.kinds:
                arrays[f"mask/{i}"] = np.packbits(self.masks[i])  # 8 pixels a byte
            if i in self.clicks:
                entry["clicks"] = [[float(x), float(y), bool(p)] for x, y, p in self.clicks[i]]
            if i in self.base:
                entry["base"] = self.base[i] is not None
                if self.base[i] is not None:
                    arrays[f"base/{i}"] = np.packbits(self.base[i])
            per_slice[str(i)] = entry
        header = {"range": [int(v) for v in self.slice_range], "offset": [float(v) for v in self.offset],
                  "box": None if self.box is None else [int(self.box[0]), [float(v) for v in self.box[1]]],
                  "rules": None if self.rules is None else asdict(self.rules), "skip": int(self.skip),
                  "slices": per_slice}
        if slices is None and self.keep_out:
            header["keep_out"] = sorted(int(i) for i in self.keep_out)
            arrays.update({f"keep/{i}": np.packbits(m) for i, m in self.keep_out.items()})
        return header, arrays

    def apply_message(self, header: dict, arrays: dict[str, np.ndarray], image_shape: tuple[int, int],
                      keep: dict[int, np.ndarray] | None = None) -> ObjectState:
        """A new state: this one with the message of :meth:`to_message` applied (on an empty state: the whole
        state). ``keep``: masks the receiver has already (a propagation's streamed slices), for slices sent
        with ``"kept": true`` and no array. A malformed message raises :class:`PromptError` naming the field."""
        new = self.copy()
        try:
            low, high = (int(v) for v in header["range"])
            new.slice_range = (low, high)
            new.offset = np.asarray(header.get("offset", [0, 0, 0, 0]), dtype=float).reshape(4)
            box = header.get("box")
            new.box = None if box is None else (int(box[0]), np.asarray(box[1], dtype=float).reshape(4))
            rules = header.get("rules")
            new.rules = None if rules is None else StopRules(**rules)
            new.skip = int(header.get("skip", 0))
            if not 0 <= new.skip <= MAX_SKIP:
                raise ValueError(f"skip {new.skip} is not from 0 to {MAX_SKIP}")
            if "keep_out" in header:
                new.keep_out = {int(i): unpack_mask(arrays, f"keep/{int(i)}", image_shape) for i in header["keep_out"]}
            for key, entry in dict(header.get("slices", {})).items():
                i = int(key)
                for part in (new.masks, new.kinds, new.clicks, new.base):
                    part.pop(i, None)
                if entry is None:
                    continue
                if entry.get("kind") is not None:
                    new.kinds[i] = Kind(entry["kind"])
                    new.masks[i] = keep[i] if entry.get("kept") and keep and i in keep else \
                        unpack_mask(arrays, f"mask/{i}", image_shape)
                if "clicks" in entry:
                    new.clicks[i] = [(float(x), float(y), bool(p)) for x, y, p in entry["clicks"]]
                if "base" in entry:
                    new.base[i] = unpack_mask(arrays, f"base/{i}", image_shape) if entry["base"] else None
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise PromptError(f"The object state is malformed: {type(error).__name__}: {error}.") from None
        return new

    @classmethod
    def from_message(cls, header: dict, arrays: dict[str, np.ndarray], image_shape: tuple[int, int]) -> ObjectState:
        """The whole state that :meth:`to_message` wrote."""
        return cls((0, 0)).apply_message(header, arrays, image_shape)


def filled_slices(oriented: np.ndarray) -> dict[int, np.ndarray]:
    """{slice: mask (rows, cols)} of the slices of ``oriented`` (slices, rows, cols) bool that have any pixel,
    as :attr:`ObjectState.keep_out` holds them."""
    return {int(i): oriented[i].copy() for i in np.flatnonzero(oriented.any(axis=(1, 2)))}


def unpack_mask(arrays: dict[str, np.ndarray], name: str, image_shape: tuple[int, int]) -> np.ndarray:
    """A mask (rows, cols) from its bits as :meth:`ObjectState.to_message` packed them."""
    value, size = arrays.get(name), int(np.prod(image_shape))
    if value is None or np.shape(value) != ((size + 7) // 8,) or np.asarray(value).dtype != np.uint8:
        raise PromptError(f"The object state's {name} is missing or not the bits of a {tuple(image_shape)} mask.")
    return np.unpackbits(value, count=size).astype(bool).reshape(image_shape)


@dataclass
class Update:
    """What one step changed: ``changed`` slice → new mask (all False where a slice lost its mask), the stop
    reason per direction, notices for the user (e.g. a box clipped to the volume) and the seconds it took."""

    changed: dict[int, np.ndarray] = field(default_factory=dict)
    stopped: dict[str, str] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_header(self) -> dict:
        return {"changed": sorted(self.changed), "stopped": self.stopped, "notices": self.notices,
                "seconds": self.seconds}


def labelmap(states: dict[str, ObjectState], axes, shape_kji: tuple[int, int, int],
             names: list[str] | None = None) -> np.ndarray:
    """uint8 KJI labelmap of several objects on ``axes``' view: the i-th of ``names`` (default: the order of
    ``states``) has value i + 1 (a name without a state has no voxels). Where objects overlap, a voxel goes to
    the object it lies deepest inside (the in-plane distance to its mask's edge, mm; a tie to the earlier
    object): against the earlier object winning, step 0 of the CVPR 2025 protocol on a head CT (bone and the
    soft tissue around it) went from DSC 0.122 to 0.302 and on three sets of touching AAL structures from
    0.466/0.568/0.556 to 0.503/0.583/0.589, whatever the objects' order; the models' own evidence (logits,
    predicted IoU) and an inner-object-wins rule for nested objects measured lower (docs/interaction.md)."""
    names = list(states) if names is None else names
    if len(names) > 255:
        raise PromptError(f"A uint8 labelmap holds at most 255 objects, not {len(names)}.")
    out = np.zeros(shape_kji, np.uint8)
    oriented = axes.oriented(out)
    present = [(value, states[name]) for value, name in enumerate(names, start=1) if states.get(name) is not None]
    for index in sorted({i for _, state in present for i in state.masks}):
        layers = [(value, state.masks[index]) for value, state in present
                  if index in state.masks and state.masks[index].any()]
        if len(layers) > 1 and np.sum([mask for _, mask in layers], axis=0).max() > 1:
            depth = np.stack([np.where(mask, ndi.distance_transform_edt(mask, sampling=axes.pixel_spacing), -1.0)
                              for _, mask in layers])
            values = np.array([value for value, _ in layers], np.uint8)
            oriented[index] = np.where(depth.max(axis=0) >= 0, values[np.argmax(depth, axis=0)], 0)
            continue
        for value, mask in layers:
            oriented[index][mask] = value
    return out
