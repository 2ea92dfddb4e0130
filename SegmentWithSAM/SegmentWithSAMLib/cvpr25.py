"""The CVPR 2025 challenge format: ``segmentwithsam cvpr25 INPUT_DIR OUTPUT_DIR`` predicts every ``*.npz``.

Input, as the official ``CVPR25_iter_eval.py`` writes it before each step: ``imgs`` (D, H, W) 0–255,
``spacing`` (3,) in array order (the script passes it so to the surface distances), an optional ``boxes``
(one dict per object: ``z_min``, ``z_max``, ``z_mid`` and the 2D box ``z_mid_x_min/y_min/x_max/y_max`` on slice
``z_mid``, x = the last axis, inclusive), optional ``clicks`` (one ``{'fg': [...], 'bg': [...]}`` per object,
each click an index (d, h, w) — the script's docstring says [x, y, z], its code appends the array index) and
``clicks_order`` (per object, 'fg'/'bg' in the order given; without it, an object's fg clicks come first).
Output: ``OUTPUT_DIR/<same name>.npz`` with ``segs`` (D, H, W) uint8, object i + 1 for the i-th entry of
``boxes``/``clicks``.

Every call's result is that of the whole interaction from the prompts (the boxes, then the clicks in their
order, one per object per round), so it depends only on its file and ``prev_pred`` is not read. A second call is
fast: embeddings (:mod:`.disk_cache`) and the states after each call (:mod:`.interaction_store`) are kept on
disk, so a call with one click more applies that click only.

The challenge gives a case 90 s an object for its whole run (the box step and five click steps). Where encoding
every slice of the boxes' ranges would take more than ENCODE_SHARE of that (one slice's encoding is timed first:
a 2-core CPU, not a GPU), the boxes propagate with ``skip`` (:class:`~.actions.Box3D`): only every (skip + 1)-th
slice of the volume is encoded, for every object alike, the slices between are interpolated, and the clicks walk
the same slices.

The boxes, clicks and orders are pickled object arrays, read only through :class:`RestrictedUnpickler`. A bad
file prints one line ``segmentwithsam: error: NAME: problem``, gets no output (a stale one is removed) and makes
the exit status 2; the other files are still predicted.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .challenge import ChallengeBox
from .errors import PromptError, SegmentWithSAMError, VolumeError
from .geometry import Volume

WINDOW = "255,127.5"  # the images are 0–255 already: the identity window (W,L)
VIEW = "axial"  # the slice axis of the case volume is D, the challenge's z
BUDGET_S = 90.0  # the challenge's time for an object's whole run (its evaluator's runtime_upperbound / classes)
ENCODE_SHARE = 0.4  # of the budget, what encoding the boxes' ranges may take (see the module docstring)
BOX_KEYS = tuple(ChallengeBox.__dataclass_fields__)
_MAX_OBJECTS = 255  # segs is uint8

_ARRAY_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy(._core|.core).multiarray._reconstruct
_SCALAR_RECONSTRUCT = np.int64(0).__reduce__()[0]  # numpy(._core|.core).multiarray.scalar
_ALLOWED = {
    **{(module, "_reconstruct"): _ARRAY_RECONSTRUCT for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "scalar"): _SCALAR_RECONSTRUCT for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{("builtins", t.__name__): t for t in (list, dict, tuple, str, int, float, bool, complex)},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only lists, dicts, tuples, strings, numbers and plain NumPy arrays; any other global (a
    function, a class) raises :class:`VolumeError` naming it, before it could be called."""

    def find_class(self, module: str, name: str):
        found = _ALLOWED.get((module, name))
        if found is None:
            raise VolumeError(f"holds a pickled {module}.{name}, which is not allowed (only lists, dicts, "
                              "tuples, strings, numbers and plain arrays are read)")
        return found


def _read_member(archive: zipfile.ZipFile, key: str):
    """Array ``key`` of an open npz: plain arrays without pickle, object arrays through the restricted
    unpickler; None when absent."""
    member = f"{key}.npy"
    if member not in archive.namelist():
        return None
    with archive.open(member) as file:
        data = io.BytesIO(file.read())
    version = np.lib.format.read_magic(data)
    if version == (1, 0):
        _, _, dtype = np.lib.format.read_array_header_1_0(data)
    elif version == (2, 0):
        _, _, dtype = np.lib.format.read_array_header_2_0(data)
    else:
        dtype = None  # version 3 headers: read_array below reads them, and refuses object arrays
    if dtype is None or not dtype.hasobject:
        data.seek(0)
        return np.lib.format.read_array(data, allow_pickle=False)
    try:
        value = RestrictedUnpickler(data).load()
    except VolumeError as exc:
        raise VolumeError(f"'{key}' {exc}") from None
    if not isinstance(value, np.ndarray):
        raise VolumeError(f"'{key}' is a pickled {type(value).__name__}, not an array")
    return value


@dataclass
class Case:
    """One challenge file: ``image`` (D, H, W), ``spacing`` (3,) mm in array order, the objects' ``boxes``
    (None when the file has none) and each object's ``clicks`` round by round: ((d, h, w), positive), or None in
    a round where it had no click (the challenge's evaluator gives none to an object already perfect)."""

    name: str
    image: np.ndarray
    spacing: tuple[float, float, float]
    boxes: list[ChallengeBox] | None
    clicks: list[list[tuple[tuple[int, int, int], bool] | None]]

    @property
    def objects(self) -> int:
        return len(self.boxes) if self.boxes is not None else len(self.clicks)

    def volume(self) -> Volume:
        """The image as a volume: ``image`` is the KJI array (K = D, J = H, I = W) and the axial view shows each
        ``image[d]`` as stored (rows H, columns W) — I and J run to −R and −A, as in arrays read from
        LPS-oriented files such as the challenge's — so its slice axis is D."""
        depth, height, width = self.spacing
        return Volume(self.image, np.diag([-width, -height, depth, 1.0]))


def _integer(value, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not float(value).is_integer():
        raise PromptError(f"{what} is {value!r}, not a whole number")
    return int(value)


def _items(array, key: str) -> list:
    if array.ndim != 1 or array.dtype != object:
        raise PromptError(f"'{key}' must be a list with one entry per object, not an array of shape {array.shape} "
                          f"and type {array.dtype}")
    return list(array)


def _parse_box(entry, number: int, shape: tuple[int, int, int]) -> ChallengeBox:
    if not isinstance(entry, dict):
        raise PromptError(f"box {number} is a {type(entry).__name__}, not a dict")
    missing = [key for key in BOX_KEYS if key not in entry]
    if missing:
        raise PromptError(f"box {number} lacks {', '.join(missing)}")
    box = ChallengeBox(**{key: _integer(entry[key], f"box {number}'s {key}") for key in BOX_KEYS})
    depth, height, width = shape
    for key, size, axis in (("z_min", depth, "D"), ("z_max", depth, "D"), ("z_mid", depth, "D"),
                            ("z_mid_x_min", width, "W"), ("z_mid_x_max", width, "W"),
                            ("z_mid_y_min", height, "H"), ("z_mid_y_max", height, "H")):
        value = getattr(box, key)
        if not 0 <= value < size:
            raise PromptError(f"box {number}'s {key}={value} is outside the image ({axis} = {size})")
    for low, high in (("z_min", "z_max"), ("z_mid_x_min", "z_mid_x_max"), ("z_mid_y_min", "z_mid_y_max")):
        if getattr(box, low) > getattr(box, high):
            raise PromptError(f"box {number} is empty: {low}={getattr(box, low)} > {high}={getattr(box, high)}")
    if not box.z_min <= box.z_mid <= box.z_max:
        raise PromptError(f"box {number}'s z_mid={box.z_mid} is not between z_min={box.z_min} and z_max={box.z_max}")
    return box


def _parse_points(points, what: str, shape: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    if isinstance(points, np.ndarray) and points.dtype != object:
        points = points.reshape(-1, 3).tolist() if points.size else []
    if not isinstance(points, (list, tuple)):
        raise PromptError(f"{what} must be a list of clicks, not a {type(points).__name__}")
    parsed = []
    for n, point in enumerate(points, start=1):
        values = np.asarray(point, dtype=object).ravel().tolist() if isinstance(point, (list, tuple, np.ndarray)) \
            else [point]
        if len(values) != 3:
            raise PromptError(f"{what} {n} is {point!r}: a click is an index (d, h, w)")
        index = tuple(_integer(v, f"{what} {n}") for v in values)
        if not all(0 <= v < size for v, size in zip(index, shape, strict=True)):
            raise PromptError(f"{what} {n} at {list(index)} is outside the image (D, H, W) = {tuple(shape)}")
        parsed.append(index)
    return parsed


def _parse_order(order, fg: int, bg: int, number: int) -> list[bool | None]:
    """Each round's click of object ``number``: True (fg), False (bg) or None (a round without one)."""
    if order is None:
        return [True] * fg + [False] * bg
    values = np.asarray(order, dtype=object).ravel().tolist() if isinstance(order, (list, tuple, np.ndarray)) \
        else None
    if values is None or any(v not in ("fg", "bg", None) for v in values):
        raise PromptError(f"clicks_order {number} must list 'fg', 'bg' and None (no click that round), not {order!r}")
    if values.count("fg") != fg or values.count("bg") != bg:
        raise PromptError(f"clicks_order {number} has {values.count('fg')} fg and {values.count('bg')} bg, but "
                          f"object {number} has {fg} fg and {bg} bg clicks")
    return [None if v is None else v == "fg" for v in values]


def _parse_clicks(clicks, orders, objects: int | None, shape) -> list[list[tuple[tuple[int, int, int], bool] | None]]:
    entries = _items(clicks, "clicks")
    if objects is not None and len(entries) != objects:
        raise PromptError(f"'boxes' has {objects} entries but 'clicks' {len(entries)}: one of each per object")
    if orders is not None:
        orders = list(orders) if orders.ndim >= 1 and orders.size else [None] * len(entries)
        orders = [None if isinstance(o, np.ndarray) and o.size == 0 else o for o in orders]
        if len(orders) != len(entries):
            raise PromptError(f"clicks_order has {len(orders)} entries for {len(entries)} objects")
    result = []
    for number, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict) or set(entry) - {"fg", "bg"}:
            raise PromptError(f"clicks {number} must be a dict with 'fg' and 'bg' lists, not {entry!r:.80}")
        fg = _parse_points(entry.get("fg", []), f"object {number}'s foreground click", shape)
        bg = _parse_points(entry.get("bg", []), f"object {number}'s background click", shape)
        order = _parse_order(orders[number - 1] if orders is not None else None, len(fg), len(bg), number)
        fg_iter, bg_iter = iter(fg), iter(bg)
        result.append([None if positive is None else (next(fg_iter) if positive else next(bg_iter), positive)
                       for positive in order])
    return result


def read_case(path: str | os.PathLike) -> Case:
    """Read and check one challenge file; raises :class:`VolumeError` or :class:`PromptError` saying what is wrong."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            arrays = {key: _read_member(archive, key) for key in ("imgs", "spacing", "boxes", "clicks", "clicks_order")}
    except SegmentWithSAMError:
        raise
    except Exception as exc:  # noqa: BLE001 - anything a damaged or crafted file raises while being read
        raise VolumeError(f"it cannot be read as an npz file ({type(exc).__name__}: {exc})") from None
    image = arrays["imgs"]
    if image is None:
        raise VolumeError("it has no 'imgs' array (the image, (D, H, W))")
    if image.ndim != 3 or min(image.shape) < 1:
        raise VolumeError(f"'imgs' has shape {image.shape}; a 3D image (D, H, W) is needed")
    if image.dtype == object or not (np.issubdtype(image.dtype, np.number) or image.dtype == bool) \
            or np.iscomplexobj(image):
        raise VolumeError(f"'imgs' has type {image.dtype}; a real-valued image is needed")
    spacing = arrays["spacing"]
    if spacing is None:
        raise VolumeError("it has no 'spacing' array (the voxel size in mm, in array order)")
    if spacing.dtype == object or spacing.size != 3 or not np.issubdtype(spacing.dtype, np.number) \
            or not np.all(np.isfinite(spacing)) or not np.all(spacing.astype(float) > 0):
        raise VolumeError(f"'spacing' is {spacing.tolist()}; three positive voxel sizes (mm) are needed")
    shape = tuple(int(s) for s in image.shape)
    boxes = None
    if arrays["boxes"] is not None:
        boxes = [_parse_box(entry, n, shape) for n, entry in enumerate(_items(arrays["boxes"], "boxes"), start=1)]
    clicks: list = [[] for _ in boxes] if boxes is not None else []
    if arrays["clicks"] is not None:
        clicks = _parse_clicks(arrays["clicks"], arrays["clicks_order"], None if boxes is None else len(boxes), shape)
    case = Case(path.name, image, tuple(float(s) for s in spacing.ravel()), boxes, clicks)
    if case.objects == 0 or (boxes is None and not any(clicks)):
        raise PromptError("it has no prompts: give 'boxes' and/or 'clicks'")
    if case.objects > _MAX_OBJECTS:
        raise PromptError(f"it has {case.objects} objects; segs (uint8) holds at most {_MAX_OBJECTS}")
    return case


def predict_case(case: Case, model, cache, window: str | None = None, store: bool = True,
                 skip: int | None = None) -> tuple[np.ndarray, int, int | None]:
    """``segs`` (D, H, W) uint8 for ``case``: the boxes in order, then the clicks round by round (each object's
    k-th click in round k, as the challenge adds them), through the engine (:class:`~.api.Segmenter`). A
    background click where its object has no mask (outside its range, or before any mask) changes nothing. With
    ``store``, the states after the longest prefix of these prompts seen before are read from disk
    (:mod:`.interaction_store`) and only the prompts after it are applied: each challenge step, a new process
    with one click more, then costs one click. ``skip``: the boxes' (None: chosen by :func:`skip_for_budget`).
    Returns ``segs``, how many prompts were applied and the skip the boxes were given now (None: no box was)."""
    from .api import Segmenter
    from .interaction_store import InteractionStore

    volume = case.volume()
    window = window or WINDOW
    segmenter = Segmenter(volume, model, VIEW, window=window, cache=cache)
    names = [f"object_{i + 1}" for i in range(case.objects)]
    given = [] if skip is None else [skip]  # states made with a given skip are found by it
    prompts: list = [["box", name, box.as_dict(), *given] for name, box in zip(names, case.boxes or [], strict=False)]
    for round_ in range(max((len(c) for c in case.clicks), default=0)):
        prompts += [["click", name, [int(v) for v in clicks[round_][0]], bool(clicks[round_][1])]
                    for name, clicks in zip(names, case.clicks, strict=True)
                    if round_ < len(clicks) and clicks[round_] is not None]
    states = InteractionStore(model, volume.identity, window, VIEW) if store else None
    done = 0
    for count in range(len(prompts), 0, -1) if states is not None else ():
        found = states.get(prompts[:count], segmenter.axes.image_shape)
        if found is not None:
            segmenter.states.update(found)
            done = count
            break
    boxes = [ChallengeBox(**args[0]) for kind, _, *args in prompts[done:] if kind == "box"]
    if boxes and skip is None:
        skip = skip_for_budget(segmenter.session, boxes, case.objects)
    for kind, name, *args in prompts[done:]:
        if kind == "box":
            box = ChallengeBox(**args[0])
            corners_ijk = [[box.z_mid_x_min, box.z_mid_y_min, box.z_mid], [box.z_mid_x_max, box.z_mid_y_max, box.z_mid]]
            segmenter.box3d(name, volume.to_ras(corners_ijk), (box.z_min, box.z_max), skip=skip)
            continue
        (d, h, w), positive = args
        try:
            segmenter.click(name, volume.to_ras([w, h, d])[0], positive)
        except PromptError:
            if positive:
                raise
            # A background click where the object has no mask removes nothing; the challenge has no way to hear
            # an error, and failing the file would score every object as empty.
    if states is not None and done < len(prompts):
        states.put(prompts, segmenter.states)
    return segmenter.labelmap(names), len(prompts) - done, skip if boxes else None


def skip_for_budget(session, boxes: list[ChallengeBox], objects: int) -> int:
    """The least skip (0 to :data:`~.propagation.MAX_SKIP`) at which encoding the slices of ``boxes``' ranges
    not yet cached fits ENCODE_SHARE of the case's budget (BUDGET_S an object); 0 for a model that tracks every
    slice with its memory (SAM 2). One of those slices is encoded untimed (the first box's middle one, needed in
    any case: the engine's first run warms it up, CUDA's modules or oneDNN's kernels), then an even one, timed."""
    from .propagation import MAX_SKIP

    if session.model.tracks_video:
        return 0
    needed = {z for box in boxes for z in range(box.z_min, box.z_max + 1)}
    todo = sorted(z for z in needed if not session.is_cached(VIEW, z))
    if not todo:
        return 0
    warm = boxes[0].z_mid if boxes[0].z_mid in todo else todo[0]
    session.prefetch(VIEW, warm)
    rest = [z for z in todo if z != warm]
    if not rest:
        return 0
    timed = next((z for z in rest if z % 2 == 0), rest[0])  # needed at skip 0 and 1
    start = time.perf_counter()
    session.prefetch(VIEW, timed)
    seconds = time.perf_counter() - start
    allowed = ENCODE_SHARE * BUDGET_S * objects
    return next((skip for skip in range(MAX_SKIP + 1) if seconds * len(rest) / (skip + 1) <= allowed), MAX_SKIP)


def challenge_layout(volume: Volume, window=None) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A volume as a challenge image: its axial slices as displayed, (D, H, W) uint8 0–255 through ``window``
    (a :func:`.preprocessing.resolve_window` spec; None: the 0.5–99.5 percentiles, as the challenge scaled MR),
    and the spacing in that order. Labelmaps take the same layout with ``slice_axes(volume, "axial").oriented``."""
    from .geometry import slice_axes
    from .preprocessing import resolve_window

    axes = slice_axes(volume, VIEW)
    image = resolve_window(volume.array, window).apply(axes.oriented(volume.array))
    return np.ascontiguousarray(np.rint(image * 255).astype(np.uint8)), axes.oriented_spacing


def _object_array(rows: list) -> np.ndarray:
    """``rows`` as NumPy stores a list given to savez: an array when regular, else a 1D object array of them."""
    if len({len(r) for r in rows}) <= 1:
        return np.asarray(rows)
    array = np.empty(len(rows), dtype=object)
    array[:] = rows
    return array


def write_case(path: str | os.PathLike, image: np.ndarray, spacing, boxes: list[ChallengeBox] | None = None,
               clicks: list[list[tuple[tuple[int, int, int], bool] | None]] | None = None,
               prev_pred: np.ndarray | None = None) -> None:
    """Write a case as the official script does before a step: boxes and clicks as lists of dicts of NumPy
    integers (so pickled object arrays), ``clicks_order`` per object (None for a round without a click),
    ``prev_pred`` if given."""
    arrays: dict = {"imgs": image, "spacing": np.asarray(spacing, dtype=float)}
    if boxes is not None:
        arrays["boxes"] = [{key: np.int64(value) for key, value in box.as_dict().items()} for box in boxes]
    if clicks is not None:
        given = [[click for click in object_clicks if click is not None] for object_clicks in clicks]
        arrays["clicks"] = [{"fg": [[np.int64(v) for v in index] for index, positive in object_clicks if positive],
                             "bg": [[np.int64(v) for v in index] for index, positive in object_clicks if not positive]}
                            for object_clicks in given]
        arrays["clicks_order"] = _object_array([[None if click is None else "fg" if click[1] else "bg"
                                                 for click in object_clicks] for object_clicks in clicks])
    if prev_pred is not None:
        arrays["prev_pred"] = prev_pred
    np.savez_compressed(path, **arrays)


def run(input_dir: str | os.PathLike, output_dir: str | os.PathLike, load_model, on_error=None,
        window: str | None = None, skip: int | None = None) -> dict:
    """Predict every ``*.npz`` of ``input_dir`` into ``output_dir``; ``load_model()`` is called once, for the first
    good file; ``window`` replaces the identity window of 0–255 images; ``skip``: the boxes' (None: by the time
    budget, :func:`skip_for_budget`). ``on_error(name, message)`` hears of each bad file. Returns a report: per
    file the objects, clicks, seconds, encoder runs and the boxes' skip, and the failures."""
    from .cache import command_cache
    from .io import atomic_write

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise SegmentWithSAMError(f"The input folder {input_dir} does not exist.")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SegmentWithSAMError(f"The output folder {output_dir} cannot be created: {exc.strerror}.") from None
    model = cache = None
    report: dict = {"files": [], "failed": [], "load_model_s": 0.0}
    for path in sorted(input_dir.glob("*.npz")):
        out = output_dir / path.name
        start = time.perf_counter()
        try:
            case = read_case(path)
            if model is None:
                model = load_model()
                cache = command_cache(model)
                report["load_model_s"] = round(time.perf_counter() - start, 3)
                start = time.perf_counter()
            encoded = model.encoder_runs
            segs, applied, used = predict_case(case, model, cache, window, skip=skip)
            atomic_write(out, ".npz", lambda tmp, segs=segs: np.savez_compressed(tmp, segs=segs))
        except SegmentWithSAMError as exc:
            out.unlink(missing_ok=True)  # a stale output would be scored as this step's
            report["failed"].append({"file": path.name, "error": str(exc)})
            if on_error is not None:
                on_error(path.name, str(exc))
            continue
        clicks = sum(click is not None for rounds in case.clicks for click in rounds)
        report["files"].append({"file": path.name, "objects": case.objects, "clicks": clicks,
                                "encoded": model.encoder_runs - encoded, "prompts_applied": applied, "skip": used,
                                "seconds": round(time.perf_counter() - start, 3), "out": str(out)})
    if model is not None:
        report.update(model=model.name, device=str(model.device), engine=model.engine, cache=cache.stats())
    return report


def cmd_cvpr25(args) -> int:
    """The ``cvpr25`` command: one error line per bad file on stderr; exit status 2 if any file failed."""
    import json

    from .cli import _load_model

    if args.backend is not None:
        raise SegmentWithSAMError("cvpr25 runs the model in this process, as the challenge's container does: "
                                  "--backend is not for it.")

    def complain(name: str, message: str) -> None:
        print(f"segmentwithsam: error: {name}: {message}.", file=sys.stderr)

    start = time.perf_counter()
    report = run(args.input_dir, args.output_dir, lambda: _load_model(args), complain, args.window, args.skip)
    report["seconds"] = round(time.perf_counter() - start, 3)
    if args.json:
        print(json.dumps(report, separators=(",", ":")))
    else:
        print(f"Predicted {len(report['files'])} of {len(report['files']) + len(report['failed'])} files into "
              f"{args.output_dir} in {report['seconds']:.1f} s"
              + "".join(f"\n  {f['file']}: {f['objects']} objects, {f['clicks']} clicks, {f['seconds']:.1f} s, "
                        f"{f['encoded']} slices encoded"
                        + (f" (skip {f['skip']}: every {f['skip'] + 1} slices)" if f["skip"] else "")
                        for f in report["files"]))
    return 2 if report["failed"] else 0
