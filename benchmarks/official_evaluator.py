"""The challenge's own evaluator, CVPR25_iter_eval.py (GitHub, JunMa11/CVPR-MedSegFMCompetition), on our predict.sh:
a 2-class head CT of 108 x 256 x 256 (1 the skull, 2 the head around it; a 3D box each, then 5 clicks) and, when
the development set is built, its MR case with 4 organs and no boxes (clicks only). A stand-in `docker`, first on
PATH, runs predict.sh on the script's inputs/outputs folders at each of its six steps; the script's table is
printed with its running times against its budget (90 s per class).

    CVPR25_EVAL_SCRIPT=/tmp/cvpr25/CVPR25_iter_eval.py CVPR25_EVAL_PYTHON=/tmp/cvpr25-eval/bin/python \\
        python benchmarks/official_evaluator.py      # setting up the script and its Python: docs/testing.md
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from SegmentWithSAMLib.challenge import box_from_truth
from SegmentWithSAMLib.cvpr25 import write_case

from common import print_table, write_json

PREDICT_SH = Path(__file__).resolve().parents[1] / "predict.sh"
SECONDS_PER_CLASS = 90  # the script's budget per case: 90 s per class
BUDGET_SHARE = 0.6  # issue #30's target: the whole run within 60 % of it

# `docker container ...` (the script's cleanup) does nothing; `docker run ...` keeps a copy of the step's inputs in
# $EVALUATOR_STEPS/<step>/ and runs predict.sh on the folders the script mounts.
DOCKER_STAND_IN = """#!/bin/sh
[ "$1" = container ] || exit 0
for arg; do
  case "$arg" in
    *:/workspace/inputs/) inputs=${arg%%:*} ;;
    *:/workspace/outputs/) outputs=${arg%%:*} ;;
  esac
done
step=$(ls "$EVALUATOR_STEPS" | wc -l)
mkdir "$EVALUATOR_STEPS/$step" && cp "$inputs"/*.npz "$EVALUATOR_STEPS/$step/"
SEGMENTWITHSAM_INPUTS=$inputs SEGMENTWITHSAM_OUTPUTS=$outputs exec sh "$PREDICT_SH"
"""


def run_official(folder: Path, name: str, image: np.ndarray, spacing, gts: np.ndarray, boxes: bool,
                 script: str, python: str = sys.executable, env: dict | None = None) -> tuple[dict, Path]:
    """Run the script on one case in ``folder`` (its layout made there): ``gts`` the labelmap (D, H, W) uint8, a
    box per class from the truth as ``get_boxes.py`` draws it when ``boxes``. Returns the script's table row
    and the folder of each step's inputs as predict.sh saw them (``<step>/<name>.npz``)."""
    run, steps, bin_dir = folder / "run", folder / "steps", folder / "bin"
    for path in (run / "imgs", run / "gts", run / "team", steps, bin_dir):
        path.mkdir(parents=True)
    classes = [label for label in np.unique(gts) if label]
    write_case(run / "imgs" / name, image, spacing, [box_from_truth(gts == c) for c in classes] if boxes else None)
    np.savez_compressed(run / "gts" / name, gts=gts)
    (run / "team" / "segmentwithsam.tar.gz").write_bytes(b"")  # only its name is used: the team's name
    (bin_dir / "docker").write_text(DOCKER_STAND_IN)
    (bin_dir / "docker").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "EVALUATOR_STEPS": str(steps),
           "PREDICT_SH": str(PREDICT_SH), **(env or {})}
    done = subprocess.run([python, script, "-i", "imgs", "-o", "seg", "-d", "team", "-val_gts", "gts"], cwd=run,
                          env=env, capture_output=True, text=True, timeout=1800)
    table = run / "seg" / "segmentwithsam" / "segmentwithsam_metrics.csv"
    if done.returncode or not table.is_file() or "Error processing" in done.stdout:
        raise RuntimeError(f"CVPR25_iter_eval.py failed:\n{(done.stdout + done.stderr)[-3000:]}")
    with open(table, newline="") as file:
        (row,) = list(csv.DictReader(file))
    return row, steps


def cases():
    """(label, case name, image, spacing, labelmap, with boxes) for the head CT and, if built, the MR case."""
    from devset import devset_cases
    from interactive3d import ct_cases

    ct = {name: (image, spacing, truth) for name, image, spacing, truth in ct_cases()}
    image, spacing, head = ct["Head"]
    skull = ct["Skull"][2]
    gts = np.zeros(image.shape, np.uint8)
    gts[head] = 2
    gts[skull] = 1
    yield "head CT: skull, head around it (boxes)", "headct.npz", image, spacing, gts, True
    organs = ["MR_liver", "MR_kidney_right", "MR_kidney_left", "MR_spleen"]
    try:
        found = list(devset_cases(names=organs))
    except FileNotFoundError:
        return
    _, _, image, spacing, _ = found[0]
    gts = np.zeros(image.shape, np.uint8)
    for name, _, _, _, truth in found:
        gts[truth] = organs.index(name) + 1
    yield "CHAOS MR: liver, kidneys, spleen (clicks only)", "chaos.npz", image, spacing, gts, False


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    script = os.environ.get("CVPR25_EVAL_SCRIPT")
    if not script:
        raise SystemExit("Set CVPR25_EVAL_SCRIPT to CVPR25_iter_eval.py (docs/testing.md).")
    python = os.environ.get("CVPR25_EVAL_PYTHON", sys.executable)
    rows, records = [], []
    for label, name, image, spacing, gts, boxes in cases():
        with tempfile.TemporaryDirectory() as folder:
            row, _ = run_official(Path(folder), name, image, spacing, gts, boxes, script, python)
        classes = int(row["num_class"])
        seconds = float(row["TotalRunningTime"])
        share = seconds / (SECONDS_PER_CLASS * classes)
        dscs = [float(row[f"DSC_{step}"]) for step in range(1, 7)]
        kept = share <= BUDGET_SHARE and all(b >= a for a, b in zip(dscs, dscs[1:], strict=False))
        records.append({"case": label, "shape": list(image.shape), "classes": classes, "row": row})
        rows.append([label, "×".join(map(str, image.shape)), classes, *dscs, float(row["NSD_Final"]),
                     float(row["DSC_AUC"]), float(row["NSD_AUC"]), seconds, f"{share:.0%}",
                     "met" if kept else "not met"])
    print_table(["case", "size", "classes", *(f"DSC{s}" for s in range(1, 7)), "NSD final", "DSC AUC", "NSD AUC",
                 "seconds", "of budget", f"≤ {BUDGET_SHARE:.0%} and no click lowers"], rows)
    write_json("official_evaluator", {"records": records})


if __name__ == "__main__":
    main()
