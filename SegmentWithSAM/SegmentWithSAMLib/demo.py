"""``segmentwithsam demo`` and ``segmentwithsam info``."""

from __future__ import annotations

import platform
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from .data import AAL_STRUCTURES, colin27
from .errors import OutputError
from .metrics import dice
from .release import RELEASE

DEMO_STRUCTURE = "Hippocampus_L"
DEMO_MARGIN_PX = 2  # the demo's box is the atlas label's bounding box plus this margin, as a user would drag it


def run_demo(out_dir: Path, device: str | None = "auto") -> dict:
    """Segment the left hippocampus of Colin27 on its middle axial slice from a box; write the labelmap and
    a PNG picture; report Dice against the AAL atlas label."""
    from .api import Segmenter
    from .geometry import bounding_box, slices_with
    from .io import read_volume, write_labelmap
    from .loading import load_model
    from .render import save_overlay_png

    data = colin27()
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"Cannot create the output folder {out_dir}: {exc.strerror}.") from None
    volume, atlas = read_volume(data.image), read_volume(data.atlas)
    label = atlas.array == AAL_STRUCTURES[DEMO_STRUCTURE]
    start = time.perf_counter()
    model = load_model("litemedsam", device)
    segmenter = Segmenter(volume, model, "axial")
    axes = segmenter.axes
    oriented = axes.oriented(label)
    slices = slices_with(axes, label)
    index = int(slices[len(slices) // 2])
    box_xy = bounding_box(oriented[index], DEMO_MARGIN_PX)
    box_ras = volume.to_ras(axes.pixel_to_ijk(index, box_xy.reshape(2, 2)))
    mask2d = segmenter.prompt(DEMO_STRUCTURE, box_ras=box_ras).changed[index]
    elapsed = (time.perf_counter() - start) * 1e3
    labelmap = out_dir / "hippocampus_L.nii.gz"
    picture = out_dir / "hippocampus_L_axial.png"
    write_labelmap(segmenter.mask(DEMO_STRUCTURE), volume, labelmap, name=DEMO_STRUCTURE)
    image = segmenter.session.windowed_slice(axes, index)
    save_overlay_png(image, mask2d, picture, pixel_spacing=axes.pixel_spacing, box=box_xy,
                     reference=oriented[index])
    score = dice(mask2d, oriented[index])
    source = "shipped Colin27 crop" if data.shipped else str(data.image)
    text = (f"LiteMedSAM on {source}: left hippocampus, axial slice {index}, box prompt\n"
            f"  mask: {int(mask2d.sum())} voxels, Dice vs AAL atlas {score:.3f}, "
            f"{elapsed:.0f} ms (model load + encode + decode) on {model.device}\n"
            f"  labelmap: {labelmap.resolve()}\n"
            f"  picture:  {picture.resolve()} (orange: LiteMedSAM, cyan: atlas, yellow: box)")
    return {"text": text, "structure": DEMO_STRUCTURE, "slice": index, "dice": round(score, 4),
            "voxels": int(mask2d.sum()), "ms": round(elapsed, 1), "device": str(model.device),
            "labelmap": str(labelmap.resolve()), "picture": str(picture.resolve()), "data": source}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def system_info() -> dict:
    """Versions, the device that would be used, the models found and the cache settings; PyTorch's settings
    only where it is installed (the default model runs without it)."""
    import sys

    from .cache import CACHE_ENV, DEFAULT_CACHE_MB, default_cache_bytes
    from .device import select_device
    from .disk_cache import default_disk_cache_bytes, default_disk_cache_dir
    from .engines import available_engines, has_torch
    from .models import registry

    models = {name: str(entry.path) if entry.installed else "not installed" for name, entry in registry().items()}
    data = colin27()
    device = str(select_device())
    torch = sys.modules.get("torch")  # select_device imported it only if a GPU may be there
    if torch is None and has_torch():
        import torch
    return {
        "segmentwithsam": RELEASE,
        "python": platform.python_version(),
        "torch": torch.__version__ if torch else "not installed",
        "openvino": _version("openvino"),
        "numpy": np.__version__,
        "SimpleITK": _version("SimpleITK"),
        "device": device,
        **({"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
            "cpu_threads": torch.get_num_threads()} if torch else {}),
        "models": models,
        "engines": available_engines(),
        "cache_max_mb": round(default_cache_bytes() / (1 << 20), 1),
        "cache_setting": f"${CACHE_ENV} (megabytes; default {DEFAULT_CACHE_MB})",
        "disk_cache": str(default_disk_cache_dir()),
        "disk_cache_max_mb": round(default_disk_cache_bytes() / (1 << 20), 1),
        "demo_data": "shipped Colin27 crop" if data.shipped else str(data.image),
    }
