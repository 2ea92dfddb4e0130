"""Real sample data: Colin27 T1 MRI with the AAL atlas (Debian's mricron-data), a small Colin27 crop shipped
with this package when that is absent, and the InVesalius head CT (Debian's invesalius-examples)."""

from __future__ import annotations

import plistlib
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import VolumeError
from .geometry import Volume

MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")
CRANIUM = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
_SHIPPED = Path(__file__).with_name("data")

# AAL atlas labels of the deep structures used in tests and benchmarks (from aal.nii.txt).
AAL_STRUCTURES: dict[str, int] = {
    "Hippocampus_L": 37, "Hippocampus_R": 38, "Amygdala_L": 41, "Amygdala_R": 42,
    "Caudate_L": 71, "Caudate_R": 72, "Putamen_L": 73, "Putamen_R": 74,
    "Pallidum_L": 75, "Pallidum_R": 76, "Thalamus_L": 77, "Thalamus_R": 78,
}


@dataclass(frozen=True)
class Colin27:
    """Paths of the Colin27 T1 image and its AAL atlas; ``shipped`` is True for the bundled crop."""

    image: Path
    atlas: Path
    shipped: bool


def colin27() -> Colin27:
    """Colin27 from Debian's ``mricron-data`` if installed, else the crop around the left hippocampus shipped
    in this package (real voxels and geometry, 1 mm)."""
    image, atlas = MRICRON_TEMPLATES / "ch2.nii.gz", MRICRON_TEMPLATES / "aal.nii.gz"
    if image.is_file() and atlas.is_file():
        return Colin27(image, atlas, shipped=False)
    return Colin27(_SHIPPED / "colin27_crop.nii.gz", _SHIPPED / "aal_crop.nii.gz", shipped=True)


def read_cranium_ct(path: str | Path = CRANIUM) -> Volume:
    """The InVesalius 'Cranium' head CT (int16 HU, 108 axial slices of 256², 0.957×0.957×1.5 mm).

    The project file is a gzipped tar of ``main.plist`` and a raw ``matrix.dat`` (K, J, I); I runs to the
    patient's left, J anterior and K superior.
    """
    path = Path(path)
    if not path.is_file():
        raise VolumeError(f"{path} does not exist: install Debian's invesalius-examples package.")
    with tarfile.open(path, "r:gz") as archive:
        members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
        header = plistlib.loads(archive.extractfile(members["main.plist"]).read())
        matrix = header["matrix"]
        raw = archive.extractfile(members[matrix["filename"]]).read()
    array = np.frombuffer(raw, dtype=np.dtype(matrix["dtype"]).newbyteorder("<")).reshape(matrix["shape"])
    sx, sy, sz = (float(s) for s in header["spacing"])
    return Volume(array.copy(), np.diag([-sx, sy, sz, 1.0]))
