"""The development set beyond Colin27: small real CT and MR cases with expert labels for the interactive 3D
benchmark — an abdominal CT organ, four abdominal MR organs and a brain tumour (two regions, two sequences).

Each case is rebuilt from files pinned in public GitHub repositories (repository, commit, path, full SHA-256),
read from a local ``git`` mirror when one holds the commit, else from raw.githubusercontent.com. The label
values of a case become 1..n (one per structure), the volume is cut along the axial axis to its structures
with a margin (at most 80 slices; the whole field of view in-plane), and each case is written as
``<name>_image.nii.gz`` + ``<name>_labels.nii.gz`` with ``devset.json`` listing cases, structures and sources.
Provenance and licences: docs/devset.md.

    python benchmarks/devset.py build [--mirror GIT_DIR ...] [--out DIR]
    python benchmarks/devset.py list [--out DIR]

``devset_cases()`` yields the structures as ``interactive3d.py`` consumes them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from SegmentWithSAMLib.cvpr25 import challenge_layout
from SegmentWithSAMLib.errors import SegmentWithSAMError
from SegmentWithSAMLib.geometry import Volume, slice_axes
from SegmentWithSAMLib.io import atomic_write, read_labelmap_on, read_volume, write_labels, write_volume

from common import print_table

DEFAULT_FOLDER = Path.home() / ".cache" / "segmentwithsam" / "devset"
MANIFEST = "devset.json"
GROUPS = ("CT organ", "MR organ", "lesion")
MAX_SLICES = 80  # along the axial axis, margins included
MAX_IN_PLANE = 512
MIN_SLICES = 5  # a structure on fewer axial slices is left out
MARGIN_MM = 10.0  # along the axial axis, each side of the structures


@dataclass(frozen=True)
class Source:
    """One case as a public repository holds it: an image and its labelmap (same grid) at a pinned commit.

    ``image`` and ``labels`` are (path in the repository, SHA-256 of the file's bytes); ``structures`` maps
    each structure's name (unique in the set) to the source label values it joins, in output order.
    ``mirror_lr`` swaps back the left and right of a file whose header has them swapped (the anatomy says so).
    """

    name: str
    group: str
    modality: str
    window: str | None  # a resolve_window spec (CT); None: the 0.5–99.5 percentiles, as the challenge scaled MR
    repo: str
    commit: str
    image: tuple[str, str]
    labels: tuple[str, str]
    structures: dict[str, tuple[int, ...]]
    dataset: str
    licence: str
    mirror_lr: bool = False


_DEEPMEDIC = ("deepmedic/deepmedic", "e10ba7c3570d06194f5dadca91d99d5e7bba7de5")
_BRATS = "examples/dataForExamples/brats2015TrainingData/test/brats_2013_pat0001_1/"
_BRATS_LABELS = (_BRATS + "OTMultiClass.nii.gz", "8177a026a5eddca3844f57a93f251000cb0da09ecbf3b53fc1fb389b211f13c2")
_BRATS_DATASET = ("BRATS 2015 training set (BRATS 2013 patient 0001), 1 mm, skull-stripped; intensities normalised "
                  "to zero mean, unit variance in the brain by DeepMedic's authors; expert labels "
                  "1 necrosis, 2 oedema, 3 non-enhancing, 4 enhancing tumour")
_BRATS_LICENCE = "CC BY-NC-SA 3.0 CH (non-commercial; per the License file beside the case)"

SOURCES: tuple[Source, ...] = (
    Source("msd_spleen_8", "CT organ", "CT", "abdomen", "NVIDIA/clara-train-examples",
           "19795f4e530d568aaae852c88a26aabf14451255",
           ("PyTorch/NoteBooks/Data/sampleData/imagesTr/spleen_8.nii.gz",
            "0895ef0ededc129386dbf47de36982f89245a995a85998fbb9af24b9af739321"),
           ("PyTorch/NoteBooks/Data/sampleData/labelsTr/spleen_8.nii.gz",
            "b4cebaf78331025592a2cc283bd9686b341a62be7f0e68a61171315252c6e840"),
           {"CT_spleen": (1,)},
           "Medical Segmentation Decathlon Task09_Spleen, case spleen_8 (portal-venous CT, HU)",
           # the Decathlon's spleen files put the liver on the patient's left (Project-MONAI/model-zoo#766)
           "CC BY-SA 4.0", mirror_lr=True),
    Source("chaos_t2spir_8", "MR organ", "MR", None, "shenqq377/Q-Net", "70a828d8cec11425785230a98ec965231b5fdd4d",
           ("data/CHAOST2/chaos_MR_T2_normalized/image_8.nii.gz",
            "a06694b5b3d61e03eb9c0f88442099c0645e116b0973a5d525332bb51d97525a"),
           ("data/CHAOST2/chaos_MR_T2_normalized/label_8.nii.gz",
            "8823734fcbf15aa1b8521d6b06e4036d966a14f2ad479e3a2042f11c1c59f49f"),
           {"MR_liver": (1,), "MR_kidney_right": (2,), "MR_kidney_left": (3,), "MR_spleen": (4,)},
           "CHAOS MR T2-SPIR training patient 8, as SSL-ALPNet preprocesses it (top 0.5 % of intensities cut, "
           "resampled to 1.25 x 1.25 x 7.7 mm, centre 256 x 256)", "CC BY-SA 4.0"),
    Source("brats13_flair", "lesion", "MR", None, *_DEEPMEDIC,
           (_BRATS + "Flair_subtrMeanDivStd.nii.gz",
            "608fea3affadec6259119af392d06be16ed837d231514c6638204f8645f29140"),
           _BRATS_LABELS, {"brain_tumour_whole": (1, 2, 3, 4)}, "FLAIR; " + _BRATS_DATASET, _BRATS_LICENCE),
    Source("brats13_t1c", "lesion", "MR", None, *_DEEPMEDIC,
           (_BRATS + "T1c_subtrMeanDivStd.nii.gz",
            "73c54c46347d20fa0e35128b011b12f210a89423469a39f89353f70baf729b70"),
           _BRATS_LABELS, {"brain_tumour_core": (1, 3, 4)}, "T1 contrast-enhanced; " + _BRATS_DATASET,
           _BRATS_LICENCE),
)


def _has_commit(git_dir: Path, commit: str) -> bool:
    return subprocess.run(["git", "--git-dir", str(git_dir), "cat-file", "-e", f"{commit}^{{commit}}"],
                          capture_output=True).returncode == 0


def fetch(repo: str, commit: str, path: str, sha256: str, mirrors: Iterable[Path] = ()) -> bytes:
    """The bytes of ``repo``'s ``path`` at ``commit``: from the first of ``mirrors`` (bare git directories) that
    has the commit, else downloaded; a ValueError unless their SHA-256 is ``sha256`` (so a Git LFS pointer or a
    changed file never passes)."""
    mirror = next((m for m in mirrors if _has_commit(m, commit)), None)
    if mirror is not None:
        done = subprocess.run(["git", "--git-dir", str(mirror), "show", f"{commit}:{path}"], capture_output=True)
        if done.returncode:
            raise ValueError(f"{mirror} has commit {commit} of {repo} but not {path}: "
                             f"{done.stderr.decode(errors='replace').strip()}")
        data, where = done.stdout, str(mirror)
    else:
        where = f"https://raw.githubusercontent.com/{repo}/{commit}/{urllib.parse.quote(path)}"
        try:
            with urllib.request.urlopen(where, timeout=120) as response:
                data = response.read()
        except OSError as error:  # URLError and timeouts included
            raise OSError(f"Cannot download {where} ({getattr(error, 'reason', error)}); give --mirror a git "
                          f"directory of {repo} that has commit {commit}.") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(f"{path} from {where} has SHA-256 {digest}, not the pinned {sha256} ({len(data)} bytes; "
                         "a Git LFS pointer or a changed file): nothing was written.")
    return data


def _read(data: bytes, folder: Path, name: str, reference: Volume | None = None) -> Volume:
    """``data`` (a NIfTI file's bytes) as a volume; on ``reference``'s grid when given."""
    path = folder / name
    path.write_bytes(data)
    return read_volume(path) if reference is None else read_labelmap_on(path, reference, "its image")


def _axial_range(mask: np.ndarray, axis: int, spacing: float) -> tuple[int, int]:
    """The first and last index along array ``axis`` of the slices kept around the KJI ``mask``: its extent
    grown by MARGIN_MM each side, the margins shrunk to keep MAX_SLICES."""
    occupied = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
    first, last = int(occupied[0]), int(occupied[-1])
    span = last - first + 1
    if span > MAX_SLICES:
        raise ValueError(f"The structures span {span} axial slices; a development case may have {MAX_SLICES}.")
    margin = min(math.ceil(MARGIN_MM / spacing), (MAX_SLICES - span) // 2)
    return max(0, first - margin), min(mask.shape[axis] - 1, last + margin)


def _build_case(source: Source, image: Volume, labels: Volume, out: Path) -> dict:
    """Write ``source``'s case (cut, labels 1..n) to ``out``; its manifest record."""
    merged = np.zeros(labels.array.shape, np.uint8)
    for value, values in enumerate(source.structures.values(), start=1):
        merged[np.isin(labels.array, values)] = value
    axes = slice_axes(image, "axial")
    axis = 2 - axes.slice_axis  # the KJI array axis of the axial slices
    in_plane = [image.array.shape[a] for a in range(3) if a != axis]
    if max(in_plane) > MAX_IN_PLANE:
        raise ValueError(f"{source.name} has {in_plane[0]}×{in_plane[1]} pixels in-plane; at most {MAX_IN_PLANE}.")
    first, last = _axial_range(merged > 0, axis, axes.spacing_ijk[axes.slice_axis])
    box = [slice(None)] * 3
    box[axis] = slice(first, last + 1)
    start = [0, 0, 0]
    start[axis] = first
    matrix = image.ijk_to_ras.copy()
    matrix[:3, 3] = (image.ijk_to_ras @ np.array([*start[::-1], 1.0]))[:3]  # start is K, J, I
    array = image.array[tuple(box)]
    cut = Volume(array.astype(np.float32) if array.dtype == np.float64 else array, matrix)
    kept = merged[tuple(box)]

    structures = {}
    for value, name in enumerate(source.structures, start=1):
        slices = int(slice_axes(cut, "axial").oriented(kept == value).any(axis=(1, 2)).sum())
        if slices < MIN_SLICES:
            print(f"{name}: {slices} axial slices, fewer than {MIN_SLICES}: left out", file=sys.stderr)
            kept[kept == value] = 0
            continue
        structures[name] = {"value": value, "slices": slices, "voxels": int((kept == value).sum()),
                            "source_values": list(source.structures[name])}
    write_volume(cut, out / f"{source.name}_image.nii.gz")
    write_labels(kept, cut, out / f"{source.name}_labels.nii.gz",
                 {entry["value"]: name for name, entry in structures.items()})
    return {"name": source.name, "group": source.group, "modality": source.modality, "window": source.window,
            "image": f"{source.name}_image.nii.gz", "labels": f"{source.name}_labels.nii.gz",
            "structures": structures, "size_ijk": list(cut.shape_ijk),
            "spacing_ijk": [round(float(s), 4) for s in cut.spacing],
            "axial_range": [first, last], "axial_slices_in_source": image.array.shape[axis],
            "source": {"repo": source.repo, "commit": source.commit, "image_path": source.image[0],
                       "image_sha256": source.image[1], "labels_path": source.labels[0],
                       "labels_sha256": source.labels[1], "dataset": source.dataset, "licence": source.licence,
                       "left_right_mirrored": source.mirror_lr}}


def build(out: Path = DEFAULT_FOLDER, mirrors: Iterable[Path] = ()) -> dict:
    """Fetch and check every source file first, then write each case and the manifest into ``out`` (mode 0700),
    every file atomically. Returns the manifest."""
    mirrors = tuple(mirrors)
    names = [name for source in SOURCES for name in source.structures]
    if len(set(names)) != len(names) or any(source.group not in GROUPS for source in SOURCES):
        raise ValueError(f"Structure names must be unique across the set and groups one of {', '.join(GROUPS)}.")
    blobs: dict[tuple[str, str, str], bytes] = {}
    for source in SOURCES:
        for path, sha256 in (source.image, source.labels):
            if (source.repo, source.commit, path) not in blobs:
                blobs[source.repo, source.commit, path] = fetch(source.repo, source.commit, path, sha256, mirrors)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    out.chmod(0o700)
    cases = []
    with tempfile.TemporaryDirectory(prefix="devset-") as tmp:
        for source in SOURCES:
            image = _read(blobs[source.repo, source.commit, source.image[0]], Path(tmp), f"{source.name}_i.nii.gz")
            labels = _read(blobs[source.repo, source.commit, source.labels[0]], Path(tmp),
                           f"{source.name}_l.nii.gz", image)
            if source.mirror_lr:  # the RAS x of every voxel negated: right and left swap, nothing else moves
                mirror = np.diag([-1.0, 1.0, 1.0, 1.0]) @ image.ijk_to_ras
                image, labels = Volume(image.array, mirror), Volume(labels.array, mirror)
            cases.append(_build_case(source, image, labels, out))
    manifest = {"about": "SegmentWithSAM development set; provenance and licences in docs/devset.md",
                "cases": cases}
    atomic_write(out / MANIFEST, ".json", lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))
    return manifest


def load_manifest(folder: str | os.PathLike | None = None) -> dict:
    """``devset.json`` of ``folder`` (default ~/.cache/segmentwithsam/devset)."""
    path = Path(folder or DEFAULT_FOLDER) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: build the set with python benchmarks/devset.py build.")
    return json.loads(path.read_text())


def devset_cases(folder: str | os.PathLike | None = None,
                 names: Iterable[str] | None = None) -> Iterator[tuple[str, str, np.ndarray, tuple, np.ndarray]]:
    """(structure name, group, image, spacing, truth) for each structure of the set (or of ``names``), in the
    set's order: ``image`` (D, H, W) uint8 and ``spacing`` (D, H, W) mm as :func:`challenge_layout` gives them
    (axial, the case's window), ``truth`` (D, H, W) bool in the same layout. Each case is read only when one of
    its structures is asked for."""
    folder = Path(folder or DEFAULT_FOLDER)
    cases = load_manifest(folder)["cases"]
    known = [name for case in cases for name in case["structures"]]
    wanted = known if names is None else list(names)
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise ValueError(f"Unknown development-set structures: {', '.join(unknown)} (known: {', '.join(known)}).")
    for case in cases:
        selected = [name for name in case["structures"] if name in wanted]
        if not selected:
            continue
        volume = read_volume(folder / case["image"])
        labels = read_labelmap_on(folder / case["labels"], volume, case["image"])
        image, spacing = challenge_layout(volume, case["window"])
        oriented = slice_axes(labels, "axial").oriented(labels.array)
        for name in selected:
            yield name, case["group"], image, spacing, oriented == case["structures"][name]["value"]


def print_list(folder: str | os.PathLike | None = None) -> None:
    """The table of cases and structures of the built set."""
    rows = []
    for case in load_manifest(folder)["cases"]:
        size = "×".join(str(n) for n in case["size_ijk"])
        spacing = "×".join(f"{s:g}" for s in case["spacing_ijk"])
        for name, entry in case["structures"].items():
            rows.append([name, case["group"], case["name"], case["modality"], case["window"] or "percentiles",
                         entry["value"], entry["slices"], entry["voxels"], size, spacing,
                         case["source"]["licence"].split(" (")[0]])
    print_table(["structure", "group", "case", "modality", "window", "value", "slices", "voxels", "size IJK",
                 "spacing mm", "licence"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="fetch the pinned sources and write the cases")
    build_parser.add_argument("--mirror", type=Path, nargs="+", action="extend", default=[], metavar="GIT_DIR",
                              help="bare git directories to read the pinned commits from before downloading")
    for command in (build_parser, commands.add_parser("list", help="print the cases and structures")):
        command.add_argument("--out", type=Path, default=DEFAULT_FOLDER,
                             help=f"the set's folder (default {DEFAULT_FOLDER})")
    args = parser.parse_args()
    try:
        if args.command == "build":
            build(args.out, args.mirror)
            print(f"wrote {args.out}\n")
        print_list(args.out)
    except (OSError, ValueError, SegmentWithSAMError) as error:
        sys.exit(f"devset: {error}")


if __name__ == "__main__":
    main()
