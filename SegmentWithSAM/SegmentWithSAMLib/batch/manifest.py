"""The batch manifest: one row per object (CSV, or JSON lines with the same keys), checked before any work.

A malformed row raises :class:`~..errors.ManifestError` naming the row and the field. Files are not opened
here: a missing volume is that row's failure at run time, so the other rows still run. See ``docs/batch.md``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ManifestError, SegmentWithSAMError
from ..io import file_suffix
from ..propagation import MAX_SKIP, StopRules

DIRECTIONS = ("up", "down", "both", "none")  # none: the prompted slice only
_STOPS = StopRules()


@dataclass(frozen=True)
class Options:
    """The model, window and propagation options of a row; the defaults are the command line's."""

    model: str = "litemedsam"
    checkpoint: str | None = None
    device: str = "auto"
    engine: str = "auto"
    window: str | None = None
    direction: str = "both"
    skip: int = 0
    min_similarity: float = _STOPS.min_similarity
    min_score: float = _STOPS.min_score
    max_area_ratio: float = _STOPS.max_area_ratio
    min_overlap: float = _STOPS.min_overlap
    max_empty: int = _STOPS.max_empty
    keep: str | None = None  # LABELMAP[:L1,L2,...]: voxels the row's object never takes (e.g. finished labels)
    backend: str | None = None  # a server (segmentwithsam serve) to segment on, instead of the model here
    cafile: str | None = None  # the certificate a TLS server's is checked against


@dataclass(frozen=True)
class Row:
    """One object to segment: paths (absolute), prompts in RAS millimetres and its options.

    ``box`` (6,): two opposite corners; ``points``/``negatives``: (R, A, S) triples; ``lasso``: a closed
    outline's triples on one slice, instead of a box and points; ``scribbles``: (triples, positive) strokes
    applied after the prompt and its propagation (the first, positive, starts the object when there is no other
    prompt); ``slice_range`` (A, B) along the view's slice axis; ``value``: its label value in a multi-label
    output (None: by position).
    """

    number: int  # 1-based position in the manifest
    volume: str
    name: str
    view: str
    output: str
    box: tuple[float, ...] | None = None
    points: tuple[tuple[float, float, float], ...] = ()
    negatives: tuple[tuple[float, float, float], ...] = ()
    lasso: tuple[tuple[float, float, float], ...] | None = None
    scribbles: tuple[tuple[tuple[tuple[float, float, float], ...], bool], ...] = ()
    slice_range: tuple[int, int] | None = None
    seed: str | None = None
    label: int | None = None
    reference: str | None = None
    reference_label: int | None = None
    value: int | None = None
    options: Options = field(default_factory=Options)


@dataclass(frozen=True)
class Job:
    """The rows written into one output file (one row, or several as a multi-label labelmap), with the label
    value of each."""

    output: str
    volume: str
    rows: tuple[Row, ...]
    values: tuple[int, ...]


ROW_FIELDS = ("volume", "name", "view", "box", "range", "points", "negatives", "lasso", "scribbles", "seed", "label",
              "reference", "reference_label", "value", "output")
OPTION_FIELDS = tuple(f.name for f in fields(Options))


class _Cells:
    """The cells of one manifest row, parsed one field at a time; errors name the row and the field."""

    def __init__(self, source: str, number: int, cells: Mapping[str, Any]) -> None:
        self.source, self.number = source, number
        self.cells = {str(k).strip().lower(): v for k, v in cells.items() if k is not None}
        unknown = sorted(set(self.cells) - set(ROW_FIELDS) - set(OPTION_FIELDS))
        if unknown:
            raise self.error(unknown[0], f"unknown column; the columns are {', '.join(ROW_FIELDS + OPTION_FIELDS)}")

    def error(self, name: str, problem: str) -> ManifestError:
        return ManifestError(f"{self.source}: row {self.number}, field {name}: {problem}")

    def raw(self, name: str):
        value = self.cells.get(name)
        return None if value is None or (isinstance(value, str) and not value.strip()) else value

    def text(self, name: str, required: bool = False) -> str | None:
        value = self.raw(name)
        if value is None and required:
            raise self.error(name, "is required")
        return None if value is None else str(value).strip()

    def number_of(self, name: str, kind: type, default=None):
        value = self.raw(name)
        if value is None:
            return default
        what = "a number" if kind is float else "a whole number"
        try:
            parsed = float(value) if kind is float else int(str(value).strip())
        except (TypeError, ValueError):
            raise self.error(name, f"needs {what}, not {value!r}") from None
        if kind is float and not np.isfinite(parsed):
            raise self.error(name, f"needs a finite number, not {value!r}")
        return parsed

    def numbers(self, name: str, count: int, value=None) -> tuple[float, ...] | None:
        """``count`` comma-separated numbers (or a JSON list of them)."""
        value = self.raw(name) if value is None else value
        if value is None:
            return None
        try:
            items = value if isinstance(value, list | tuple) else str(value).replace(" ", "").split(",")
            numbers = tuple(float(v) for v in items)
        except (TypeError, ValueError):
            numbers = ()
        if len(numbers) != count or not np.all(np.isfinite(numbers)):
            raise self.error(name, f"needs {count} comma-separated numbers (RAS mm), not {value!r}")
        return numbers

    def triples(self, name: str, value=None) -> tuple[tuple[float, float, float], ...]:
        """``R,A,S`` triples separated by ``;`` (or a JSON list of triples)."""
        value = self.raw(name) if value is None else value
        if value is None:
            return ()
        items = value if isinstance(value, list) else [t for t in str(value).split(";") if t.strip()]
        return tuple(self.numbers(name, 3, item) for item in items)

    def strokes(self, name: str) -> tuple[tuple[tuple[tuple[float, float, float], ...], bool], ...]:
        """Strokes separated by ``|``, each ``R,A,S;R,A,S;…``, prefixed ``negative:`` when negative (``positive:``
        is the default), or a JSON list of {"points": [triples], "positive": bool}."""
        value = self.raw(name)
        if value is None:
            return ()
        if isinstance(value, list):
            try:
                return tuple((self.triples(name, item["points"]), bool(item.get("positive", True))) for item in value)
            except (TypeError, KeyError, AttributeError):
                raise self.error(name, 'needs a list of {"points": [[R, A, S], ...], "positive": true}') from None
        strokes = []
        for text in (t.strip() for t in str(value).split("|") if t.strip()):
            sign, _, points = text.rpartition(":")
            if sign.strip().lower() not in ("", "positive", "negative"):
                raise self.error(name, f"a stroke starts with positive: or negative:, not {sign + ':'!r}")
            strokes.append((self.triples(name, points), sign.strip().lower() != "negative"))
        return tuple(strokes)

    def path(self, name: str, base: Path, required: bool = False) -> str | None:
        value = self.text(name, required)
        return None if value is None else str((base / Path(value).expanduser()).resolve())


def _options(cells: _Cells, base: Path, defaults: Options) -> Options:
    values = {}
    for option in fields(Options):
        default = getattr(defaults, option.name)
        if option.type in ("int", "float"):
            values[option.name] = cells.number_of(option.name, int if option.type == "int" else float, default)
        elif option.name in ("checkpoint", "keep"):
            values[option.name] = cells.path(option.name, base) or default
        else:
            values[option.name] = cells.text(option.name) or default
    options = Options(**values)
    if options.direction.lower() not in DIRECTIONS:
        raise cells.error("direction", f"use {', '.join(DIRECTIONS)}, not {options.direction!r}")
    if not 0 <= options.skip <= MAX_SKIP:
        raise cells.error("skip", f"needs a whole number from 0 to {MAX_SKIP}, not {options.skip}")
    if options.window is not None:
        from ..preprocessing import resolve_window

        try:
            resolve_window(np.array([0.0, 1.0]), options.window)
        except SegmentWithSAMError as exc:
            raise cells.error("window", str(exc)) from None
    return replace(options, direction=options.direction.lower())


def volume_stem(volume: str) -> str:
    """A volume's file name without its image suffix (a DICOM folder's name)."""
    name = Path(volume).name
    return name[: len(name) - len(file_suffix(Path(name)))]


def _safe(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("._") or "object"


def parse_row(cells: _Cells, base: Path, out_dir: Path, defaults: Options, group: bool) -> Row:
    """One checked :class:`Row` from a manifest row's cells."""
    from ..actions import parse_slice_range
    from ..geometry import View

    volume = cells.path("volume", base, required=True)
    name = cells.text("name", required=True)
    try:
        view = View.parse(cells.text("view", required=True)).value
    except SegmentWithSAMError as exc:
        raise cells.error("view", str(exc)) from None
    try:
        slice_range = parse_slice_range(cells.text("range"), "range")
    except SegmentWithSAMError as exc:
        raise cells.error("range", str(exc)) from None
    box, points, negatives = cells.numbers("box", 6), cells.triples("points"), cells.triples("negatives")
    lasso, scribbles = cells.triples("lasso") or None, cells.strokes("scribbles")
    seed = cells.path("seed", base)
    if seed is None and box is None and not points and lasso is None and not (scribbles and scribbles[0][1]):
        raise cells.error("box", "give a box or points (negatives alone select nothing), a lasso, a positive "
                                 "scribble or a seed labelmap")
    if seed is not None and (box is not None or points or negatives or lasso):
        raise cells.error("seed", "a row takes prompts (box, points, negatives, lasso) or a seed labelmap, not both")
    if lasso is not None and (box is not None or points or negatives):
        raise cells.error("lasso", "a row starts with a lasso or with a box and points, not both")
    label = cells.number_of("label", int)
    if label is not None and seed is None:
        raise cells.error("label", "is the seed's label value: give a seed labelmap too")
    value = cells.number_of("value", int)
    if value is not None and not 1 <= value <= 65535:
        raise cells.error("value", f"needs a label value from 1 to 65535, not {value}")
    stem = volume_stem(volume)
    default_output = out_dir / (f"{stem}.nii.gz" if group else f"{stem}_{_safe(name)}.nii.gz")
    output = cells.path("output", out_dir) or str(default_output.resolve())
    return Row(number=cells.number, volume=volume, name=name, view=view, output=output, box=box, points=points,
               negatives=negatives, lasso=lasso, scribbles=scribbles, slice_range=slice_range, seed=seed, label=label,
               reference=cells.path("reference", base), reference_label=cells.number_of("reference_label", int),
               value=value, options=_options(cells, base, defaults))


def read_manifest(path: str | Path) -> list[dict]:
    """The rows of a CSV manifest, or of a JSON-lines one (``.jsonl``, ``.ndjson``, ``.json``), as dicts."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"Cannot read the manifest {path}: {exc}") from None
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        rows = []
        for number, line in enumerate((ln for ln in text.splitlines() if ln.strip()), start=1):
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ManifestError(f"{path}: row {number}: not a JSON object ({exc})") from None
            if not isinstance(row, dict):
                raise ManifestError(f"{path}: row {number}: not a JSON object")
            rows.append(row)
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = list(reader)
        if reader.fieldnames is None:
            raise ManifestError(f"{path}: the manifest is empty; its first line names the columns")
        for number, row in enumerate(rows, start=1):
            if None in row:
                raise ManifestError(f"{path}: row {number}: more cells than the {len(reader.fieldnames)} columns")
    if not rows:
        raise ManifestError(f"{path}: the manifest has no rows")
    return rows


def parse_rows(rows: Iterable[Mapping[str, Any]], base: str | Path, out_dir: str | Path,
               defaults: Options | None = None, group: bool = False, source: str = "manifest") -> list[Row]:
    """Checked rows from manifest rows (dicts); relative input paths are relative to ``base``, relative outputs
    to ``out_dir``. Default outputs are ``out_dir/<volume stem>_<name>.nii.gz``, or with ``group`` one
    multi-label ``out_dir/<volume stem>.nii.gz`` per volume."""
    base, out_dir = Path(base), Path(out_dir)
    parsed = [parse_row(_Cells(source, number, row), base, out_dir, defaults or Options(), group)
              for number, row in enumerate(rows, start=1)]
    if not parsed:
        raise ManifestError(f"{source}: there are no rows")
    return parsed


def group_jobs(rows: list[Row], source: str = "manifest") -> list[Job]:
    """The outputs to write: rows naming the same output form one multi-label job (same volume, names and
    label values distinct; a row without ``value`` takes the lowest value not taken, in row order)."""
    by_output: dict[str, list[Row]] = {}
    for row in rows:
        by_output.setdefault(row.output, []).append(row)
    jobs = []
    for output, members in by_output.items():
        first, names, taken = members[0], {}, {}
        for row in members:
            where = f"{source}: row {row.number}, field"
            if row.volume != first.volume:
                raise ManifestError(f"{where} output: {output} is also row {first.number}'s output, for another "
                                    "volume")
            if row.name in names:
                raise ManifestError(f"{where} name: {row.name!r} is already row {names[row.name]}'s name in {output}")
            names[row.name] = row.number
            if row.value in taken:
                raise ManifestError(f"{where} value: {row.value} is already row {taken[row.value]}'s value in {output}")
            if row.value is not None:
                taken[row.value] = row.number
        free = (v for v in range(1, 65536) if v not in taken)
        values = tuple(row.value if row.value is not None else next(free) for row in members)
        jobs.append(Job(output, first.volume, tuple(members), values))
    return jobs
