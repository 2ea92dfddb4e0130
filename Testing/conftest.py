"""Shared fixtures: real data (Colin27 + AAL, the InVesalius CT) and LiteMedSAM for the session (the PyTorch
reference and the default engine).

The encoder takes about 1.5 s per slice in PyTorch (0.5 s in OpenVINO) on a 2-core CPU, so every test shares one
model per engine and one embedding cache: a slice encoded by one test is free for the next.
"""

from __future__ import annotations

import http.server
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from SegmentWithSAMLib.cache import EmbeddingCache
from SegmentWithSAMLib.data import AAL_STRUCTURES, CRANIUM, colin27, read_cranium_ct
from SegmentWithSAMLib.geometry import Volume
from SegmentWithSAMLib.geometry import bounding_box as tight_box  # noqa: F401 (imported by the tests from here)
from SegmentWithSAMLib.io import read_volume

HEAVY = {"test_backend", "test_batch", "test_parity", "test_web", "test_propagation", "test_sam2", "test_front_end",
         "test_remote", "test_web_security", "test_web_backend"}


def pytest_collection_modifyitems(items) -> None:
    """Marks the modules that start many processes, a cluster or a browser, or propagate through whole volumes,
    as ``heavy``: ``pytest -m "not heavy"`` is the fast tier (docs/testing.md)."""
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in HEAVY:
            item.add_marker(pytest.mark.heavy)


@pytest.fixture(scope="session")
def colin() -> Volume:
    data = colin27()
    if data.shipped:
        pytest.skip("Colin27 needs Debian's mricron-data package (scripts/setup.sh installs it)")
    return read_volume(data.image)


@pytest.fixture(scope="session")
def atlas() -> Volume:
    return read_volume(colin27().atlas)


@pytest.fixture(scope="session")
def cranium() -> Volume:
    if not CRANIUM.is_file():
        pytest.skip("the head CT needs Debian's invesalius-examples package (scripts/setup.sh installs it)")
    return read_cranium_ct()


@pytest.fixture(scope="session", autouse=True)
def engine_cache():
    """Exported engine models go to .pytest_cache (kept between local runs; child processes inherit it)."""
    from SegmentWithSAMLib.engines import ENGINE_CACHE_ENV

    folder = Path(__file__).resolve().parents[1] / ".pytest_cache" / "engines"
    os.environ[ENGINE_CACHE_ENV] = str(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def disk_embeddings(tmp_path_factory):
    """The commands' embeddings on disk (``segment``, ``propagate``, ``cvpr25``) go to one folder of this run,
    not the user's cache: a slice one command encoded is free for the next, as for a user."""
    from SegmentWithSAMLib.disk_cache import DISK_CACHE_DIR_ENV

    folder = tmp_path_factory.mktemp("embeddings")
    os.environ[DISK_CACHE_DIR_ENV] = str(folder)
    return folder


@pytest.fixture(autouse=True)
def torch_on_every_core():
    """The command line sets PyTorch's threads for its model's engine (one beside OpenVINO), and tests call it in
    this process, which the session's PyTorch reference shares: every test starts with PyTorch on every core."""
    from SegmentWithSAMLib.loading import configure_process_threads

    configure_process_threads()
    yield


@pytest.fixture(scope="session")
def model():
    """The reference: LiteMedSAM in eager PyTorch (tests of the fast engine compare against it)."""
    from SegmentWithSAMLib.loading import load_model

    return load_model("litemedsam", "cpu", engine="torch")


@pytest.fixture(scope="session")
def default_model():
    """LiteMedSAM on the engine a user gets by default (OpenVINO on this CPU, about three times faster to encode
    than the reference): for tests of what surrounds the model (propagation, the entry points), not of the model."""
    from SegmentWithSAMLib.loading import load_model

    return load_model("litemedsam", "cpu")


@pytest.fixture(scope="session")
def cache() -> EmbeddingCache:
    return EmbeddingCache()


@pytest.fixture(scope="module")
def scene():
    """A real MRML scene (``slicer-core``) with the logics Slicer's modules would register, exposed where
    slicer.util looks; one per test module."""
    import types

    slicer = pytest.importorskip("slicer", reason="needs the slicer-core package (pip install -e .[test])")
    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLScene(scene)
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(scene)
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLScene(scene)
    previous = getattr(slicer, "mrmlScene", None), getattr(slicer, "modules", None)
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(
        volumes=types.SimpleNamespace(logic=lambda: volumes),
        segmentations=types.SimpleNamespace(logic=lambda: segmentations),
        colors=types.SimpleNamespace(logic=lambda: colors))
    yield scene
    slicer.mrmlScene, slicer.modules = previous


@pytest.fixture(scope="module")
def controller(scene):
    """The module's logic on ``scene`` with a real backend process (LiteMedSAM on the CPU)."""
    from SegmentWithSAMLib.backend.client import BackendClient
    from SegmentWithSAMSlicerLib.logic import SegmentationController

    logic = SegmentationController(scene, lambda model, device: BackendClient(model, "cpu"))
    yield logic
    logic.close()


@pytest.fixture(scope="module")
def colin_node(scene):
    """Colin27 loaded into ``scene`` as a scalar volume node."""
    import slicer

    data = colin27()
    if data.shipped:
        pytest.skip("needs Debian's mricron-data package")
    node = slicer.modules.volumes.logic().AddArchetypeVolume(str(data.image), "Colin27")
    assert node is not None and node.IsA("vtkMRMLScalarVolumeNode")
    return node


ORGANS = np.load(Path(__file__).parent / "data" / "organ_slices.npz")


def organ_volume(organ: str, copies: int = 1, slice_mm: float = 5.0) -> tuple[Volume, np.ndarray]:
    """One slice of the development set's CT spleen ("ct_spleen") or MR left kidney ("mr_kidney_left")
    (``Testing/data``, 0-255 as the challenge stores it: the identity window), stacked ``copies`` times
    ``slice_mm`` apart, and its organ's mask (rows, cols) on that slice."""
    image, truth = ORGANS[f"{organ}_image"], ORGANS[f"{organ}_truth"]
    rows_mm, cols_mm = ORGANS[f"{organ}_spacing"]
    return Volume(np.repeat(image[None], copies, axis=0), np.diag([-cols_mm, -rows_mm, slice_mm, 1.0])), truth


def middle_slice(atlas: Volume, axes, structure: str) -> tuple[int, np.ndarray]:
    """The middle slice of an AAL structure along ``axes`` and its 2D ground-truth mask."""
    oriented = axes.oriented(atlas.array == AAL_STRUCTURES[structure])
    slices = np.flatnonzero(oriented.any(axis=(1, 2)))
    index = int(slices[len(slices) // 2])
    return index, oriented[index]


def structure_box_ras(volume: Volume, atlas: Volume, axes, structure: str) -> tuple[int, np.ndarray]:
    """The middle slice of an AAL structure along ``axes`` and the tight box around it there, as two RAS
    corners (2, 3): the box a user would drag."""
    index, truth = middle_slice(atlas, axes, structure)
    return index, volume.to_ras(axes.pixel_to_ijk(index, tight_box(truth).reshape(2, 2)))


def reoriented_volume(volume: Volume, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> Volume:
    """``volume`` stored with its array axes permuted and flipped, geometry adjusted so that every voxel stays
    at the same RAS position (the 48 ways a scanner may store one image)."""
    shape = volume.array.shape
    old_kji = np.indices(shape)
    array = np.transpose(volume.array, perm)
    index = np.transpose(old_kji, (0, *(p + 1 for p in perm)))
    for axis, flip in enumerate(flips):
        if flip:
            array, index = np.flip(array, axis), np.flip(index, axis + 1)

    def old_ijk(new_kji):  # new ijk → old ijk from the voxel at new index 0 and one step along each new axis
        return index[(slice(None), *new_kji)][::-1].astype(float)

    t = np.eye(4)
    origin = old_ijk((0, 0, 0))
    for new_axis_ijk in range(3):
        step = [0, 0, 0]
        step[2 - new_axis_ijk] = 1
        t[:3, new_axis_ijk] = old_ijk(tuple(step)) - origin
    t[:3, 3] = origin
    return Volume(np.ascontiguousarray(array), volume.ijk_to_ras @ t)


class FileServer:
    """A local HTTP server for one file, honouring Range requests; it can cut the first transfer short."""

    def __init__(self, payload: bytes, cut_after: int | None = None) -> None:
        self.payload, self.cut_after, self.ranges = payload, cut_after, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                start = 0
                if "Range" in self.headers:
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                outer.ranges.append(start)
                body = outer.payload[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut_after is not None:
                    body, outer.cut_after = body[: outer.cut_after], None
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/model.pth"

    def close(self) -> None:
        self.httpd.shutdown()
