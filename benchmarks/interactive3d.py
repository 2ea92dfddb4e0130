"""The CVPR 2025 interactive 3D protocol on the development set: Colin27 (12 AAL deep structures), the head CT
(skull, head) and the cases of benchmarks/devset.py (an abdominal CT organ, four abdominal MR organs, a brain
tumour): DSC and NSD after the box and after each of 5 clicks, the AUCs, finals and seconds per step, per
structure and per group; beside them the oracle (a ground-truth box on every slice of the range) and one-box
propagation.

Each step runs ``segmentwithsam cvpr25`` in a fresh process on a case written as the official script writes it
(so this scores exactly what a challenge run would); the next click is simulated from that output by
:func:`SegmentWithSAMLib.challenge.simulate_click_3d`. ``--in-process`` drives one Segmenter instead, click
by click, to separate the process start from the engine's time. Whole volumes, axial (D = the S axis); the
embeddings of each run go to a fresh disk cache, so the first structure on an image pays its encoding.

    python benchmarks/devset.py build            # once (see docs/devset.md)
    python benchmarks/interactive3d.py [--groups AAL,head CT,CT organ,MR organ,lesion] [--structures ...]
                                       [--steps 5] [--in-process] [--box-shift 3 | --no-box] [--json]

Writes results/interactive3d.json (results/interactive3d-in-process.json with ``--in-process``; ``-shift<N>``
added to the name for another box margin than the benchmark's 3, ``--box-shift 0`` .. ``5`` being the
challenge's random range; ``-nobox`` with ``--no-box``).
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

import numpy as np

from SegmentWithSAMLib.challenge import BOX_SHIFT, CLICK_STEPS, auc, box_from_truth, score, simulate_click_3d
from SegmentWithSAMLib.cvpr25 import challenge_layout, write_case
from SegmentWithSAMLib.data import AAL_STRUCTURES, colin27, read_cranium_ct
from SegmentWithSAMLib.geometry import slice_axes
from SegmentWithSAMLib.io import read_volume

from common import print_table, write_json

COLIN_GROUP, HEAD_CT_GROUP = "AAL", "head CT"

CT_STRUCTURES = {"Skull": "HU > 300, largest 26-connected component (bone window)",
                 "Head": "HU > -400, largest 26-connected component, holes filled per slice (soft-tissue window)"}


def ct_cases():
    """(name, image, spacing, truth) for the head CT's structures defined from HU."""
    import cc3d
    from scipy.ndimage import binary_fill_holes

    ct = read_cranium_ct()
    hu = slice_axes(ct, "axial").oriented(ct.array)
    for name, threshold, window in (("Skull", 300, "bone"), ("Head", -400, "400,40")):
        labels = cc3d.connected_components((hu > threshold).astype(np.uint8), connectivity=26)
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        truth = labels == np.argmax(sizes)
        if name == "Head":
            truth = np.stack([binary_fill_holes(s) for s in truth])
        image, spacing = challenge_layout(ct, window)
        yield name, image, spacing, truth


def colin_cases(names):
    data = colin27()
    volume, atlas = read_volume(data.image), read_volume(data.atlas)
    image, spacing = challenge_layout(volume)
    labels = slice_axes(atlas, "axial").oriented(atlas.array)
    for name in names:
        yield name, image, spacing, labels == AAL_STRUCTURES[name]


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes so far: a step's cost apart from other
    processes' load on a shared machine."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _corners(box) -> list[list[int]]:
    """The two corners (i, j, k) = (x, y, z) of a challenge box's 2D box on its slice z_mid."""
    return [[box.z_mid_x_min, box.z_mid_y_min, box.z_mid], [box.z_mid_x_max, box.z_mid_y_max, box.z_mid]]


class Subprocess:
    """Each step: ``segmentwithsam cvpr25`` in a fresh process, as the challenge runs its container."""

    def __init__(self, folder: Path, cache_dir: Path, skip: int = 0) -> None:
        self.inputs, self.outputs, self.skip = folder / "inputs", folder / "outputs", skip
        self.inputs.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "SEGMENTWITHSAM_EMBEDDING_CACHE": str(cache_dir)}

    def step(self, image, spacing, box, clicks, prev):
        write_case(self.inputs / "case.npz", image, spacing, None if box is None else [box], [clicks],
                   prev_pred=prev)
        start, cpu = time.perf_counter(), _children_cpu()
        done = subprocess.run([sys.executable, "-m", "SegmentWithSAMLib.cli", "cvpr25", str(self.inputs),
                               str(self.outputs), "--json", "--skip", str(self.skip)], capture_output=True, text=True,
                              env=self.env)
        seconds, cpu = time.perf_counter() - start, _children_cpu() - cpu
        if done.returncode:
            raise RuntimeError(f"segmentwithsam cvpr25 failed: {done.stderr.strip()}")
        report = json.loads(done.stdout)
        with np.load(self.outputs / "case.npz", allow_pickle=False) as result:
            segs = result["segs"]
        return segs == 1, {"seconds": seconds, "cpu_s": cpu, "load_s": report["load_model_s"],
                           "engine_s": report["files"][0]["seconds"], "encoded": report["files"][0]["encoded"]}


class InProcess:
    """One Segmenter for the whole run of a structure: the box, then each click as the user gives it."""

    def __init__(self, model, cache, skip: int = 0) -> None:
        self.model, self.cache, self.skip = model, cache, skip
        self.segmenter = self.volume = None
        self.applied = 0  # clicks given to the engine so far

    def step(self, image, spacing, box, clicks, prev):
        from SegmentWithSAMLib.api import Segmenter
        from SegmentWithSAMLib.cvpr25 import VIEW, WINDOW, Case

        encoded, start, cpu = self.model.encoder_runs, time.perf_counter(), time.process_time()
        if len(clicks) <= (box is None):  # the object's first step: its box, or with no box its first click
            self.volume = Case("case.npz", image, spacing, None if box is None else [box], [[]]).volume()
            self.segmenter = Segmenter(self.volume, self.model, VIEW, WINDOW, self.cache)
            if box is not None:
                self.segmenter.box3d("object", self.volume.to_ras(_corners(box)), (box.z_min, box.z_max),
                                     skip=self.skip)
            self.applied = 0
        for (d, h, w), positive in (click for click in clicks[self.applied:] if click is not None):
            self.segmenter.click("object", self.volume.to_ras([w, h, d])[0], positive)
        self.applied = len(clicks)
        seconds = time.perf_counter() - start
        return self.segmenter.mask("object"), {"seconds": seconds, "cpu_s": time.process_time() - cpu,
                                               "engine_s": seconds, "encoded": self.model.encoder_runs - encoded}


def protocol(driver, image, spacing, truth, steps: int, shift: int = BOX_SHIFT, boxed: bool = True) -> dict:
    """The box step and ``steps`` click steps of the protocol: DSC, NSD and timing per step, AUCs, finals. A
    round where the prediction is already perfect has no click (None, as the evaluator writes it). ``shift``: the
    box's margin (pixels per 256) around the object's extent on its middle slice. Without a box (``boxed``
    False, a case the challenge gives clicks only) step 0 scores 0 and takes no time, as the evaluator counts it,
    and the first click falls on the object's centre."""
    box, clicks, prev = box_from_truth(truth, shift) if boxed else None, [], None
    dscs, nsds, timing = [], [], []
    for step in range(steps + 1):
        if step == 0 and box is None:
            prediction, times = np.zeros(truth.shape, bool), {"seconds": 0.0, "cpu_s": 0.0, "encoded": 0}
        else:
            prediction, times = driver.step(image, spacing, box, clicks, prev)
        dsc, nsd = score(truth, prediction, spacing)
        dscs.append(dsc)
        nsds.append(nsd)
        timing.append(times)
        prev = prediction.astype(np.uint8)
        if step < steps:
            clicks.append(simulate_click_3d(truth, prediction))
    return {"box": None if box is None else box.as_dict(),
            "clicks": [None if c is None else [list(c[0]), c[1]] for c in clicks],
            "dsc": dscs, "nsd": nsds, "dsc_auc": auc(dscs, steps), "nsd_auc": auc(nsds, steps),
            "final_dsc": dscs[-1], "final_nsd": nsds[-1], "timing": timing}


def baselines(model, cache, image, spacing, truth, shift: int = BOX_SHIFT) -> dict:
    """The oracle (the truth's box, grown by ``shift`` as the challenge grows it, on every slice of the range) and
    one-box propagation (the challenge's box on z_mid, propagated both ways within z_min..z_max, boxes chained)."""
    from SegmentWithSAMLib.actions import Prompt
    from SegmentWithSAMLib.api import Segmenter
    from SegmentWithSAMLib.cvpr25 import VIEW, WINDOW, Case

    box = box_from_truth(truth, shift)
    volume = Case("case.npz", image, spacing, [box], [[]]).volume()
    segmenter = Segmenter(volume, model, VIEW, WINDOW, cache)
    oracle = np.zeros(truth.shape, bool)
    for z in range(box.z_min, box.z_max + 1):
        if truth[z].any():
            b = box_from_truth(truth[z: z + 1], shift)
            update = segmenter.step(f"oracle {z}", Prompt(z, (b.z_mid_x_min, b.z_mid_y_min, b.z_mid_x_max,
                                                              b.z_mid_y_max)))
            oracle[z] = update.changed[z]
    segmenter.prompt("object", box_ras=volume.to_ras(_corners(box)))  # one box, propagated without the 3D rules
    segmenter.propagate("object", box.z_mid, "both", (box.z_min, box.z_max))
    propagated = segmenter.states["object"].oriented_mask(*truth.shape[:1], truth.shape[1:])
    return {"oracle": dict(zip(("dsc", "nsd"), score(truth, oracle, spacing), strict=True)),
            "propagation": dict(zip(("dsc", "nsd"), score(truth, propagated, spacing), strict=True))}


def _mean(results: dict) -> dict:
    """The mean over structures of every figure in the table."""
    rows = list(results.values())
    average = lambda values: np.mean(values, axis=0).tolist()  # noqa: E731
    mean = {"slices": "", **{key: average([r[key] for r in rows]) for key in
                             ("dsc", "nsd", "dsc_auc", "nsd_auc", "final_dsc", "final_nsd")},
            "timing": [{key: average([r["timing"][s][key] for r in rows]) for key in ("seconds", "cpu_s")}
                       for s in range(len(rows[0]["timing"]))]}
    for key in ("oracle", "propagation"):
        if all(key in r for r in rows):
            mean[key] = {"dsc": average([r[key]["dsc"] for r in rows]), "nsd": average([r[key]["nsd"] for r in rows])}
    return mean


def _row(name: str, r: dict) -> list:
    clicks = [t["seconds"] for t in r["timing"][1:]]
    cpu = [t["cpu_s"] for t in r["timing"][1:]]
    return [name, r["slices"], *r["dsc"], r["dsc_auc"], r["final_nsd"], r["nsd_auc"],
            round(r["timing"][0]["seconds"], 1), round(float(np.mean(clicks)), 1) if clicks else "",
            round(float(np.mean(cpu)), 1) if cpu else "", r.get("oracle", {}).get("dsc", ""),
            r.get("propagation", {}).get("dsc", "")]


def targets(results: dict) -> dict:
    """Issue #30's targets, each with its measured value and whether it is met (oracle: the mean oracle DSC)."""
    rows = list(results.values())
    step0 = float(np.mean([r["dsc"][0] for r in rows]))
    final = float(np.mean([r["final_dsc"] for r in rows]))
    worst_click = float(min(min(np.diff(r["dsc"]), default=0.0) for r in rows))
    oracle = float(np.mean([r["oracle"]["dsc"] for r in rows])) if all("oracle" in r for r in rows) else None
    small = [t["seconds"] for r in rows if r["slices"] <= 40 for t in r["timing"][1:]]
    small_cpu = [t["cpu_s"] for r in rows if r["slices"] <= 40 for t in r["timing"][1:]]
    ct_organs = [r["final_dsc"] for r in rows if r.get("group") == "CT organ"]
    known = oracle is not None
    goals = {
        "step0_over_oracle": {"value": step0 / oracle if known else None, "target": 0.95,
                              "met": bool(step0 >= 0.95 * oracle) if known else None},
        "final_over_oracle": {"value": final / oracle if known else None, "target": 1.05,
                              "met": bool(final >= 1.05 * oracle) if known else None},
        "final_minus_step0": {"value": final - step0, "target": 0.15, "met": bool(final - step0 >= 0.15)},
        "no_structure_lower_after_clicks": {"value": [n for n, r in results.items() if r["final_dsc"] < r["dsc"][0]],
                                            "met": all(r["final_dsc"] >= r["dsc"][0] for r in rows)},
        "worst_single_click_change": {"value": worst_click, "target": -0.01, "met": bool(worst_click >= -0.01)},
        "click_step_seconds_max_40_slices": {"value": float(max(small)) if small else None, "target": 10.0,
                                             "met": bool(max(small) < 10.0) if small else None},
        "click_step_cpu_seconds_max_40_slices": {"value": float(max(small_cpu)) if small_cpu else None,
                                                 "met": None, "note": "the step's CPU time, apart from other load"},
    }
    if ct_organs:
        goals["ct_organs_final_dsc_min"] = {"value": float(min(ct_organs)), "target": 0.88,
                                            "met": bool(min(ct_organs) >= 0.88)}
    return goals


def all_cases(groups: list[str], names: list[str] | None):
    """(name, group, image, spacing, truth) of the chosen groups (and names, None: all), the development set's
    read only when one of its groups is asked for."""
    from devset import GROUPS, devset_cases

    if COLIN_GROUP in groups:
        for case in colin_cases([n for n in AAL_STRUCTURES if names is None or n in names]):
            yield case[0], COLIN_GROUP, *case[1:]
    if HEAD_CT_GROUP in groups and (names is None or set(names) & set(CT_STRUCTURES)):
        for case in ct_cases():
            if names is None or case[0] in names:
                yield case[0], HEAD_CT_GROUP, *case[1:]
    if set(groups) & set(GROUPS):
        for name, group, image, spacing, truth in devset_cases(names=None if names is None else
                                                               [n for n in names if n not in AAL_STRUCTURES
                                                                and n not in CT_STRUCTURES]):
            if group in groups:
                yield name, group, image, spacing, truth


def every_group() -> list[str]:
    from devset import GROUPS

    return [COLIN_GROUP, HEAD_CT_GROUP, *GROUPS]


def means_by_group(results: dict) -> dict[str, list[dict]]:
    """The results (structure name -> a dict with its "group") of each group present, in every_group()'s order,
    labelled "mean GROUP", then all of them, labelled "mean"."""
    present = [g for g in every_group() if any(r["group"] == g for r in results.values())]
    means = {f"mean {g}": [r for r in results.values() if r["group"] == g] for g in present}
    means["mean"] = list(results.values())
    return means


def add_selection(parser: argparse.ArgumentParser) -> None:
    """The options choosing the cases: --groups and --structures."""
    parser.add_argument("--groups", default=",".join(every_group()), help=f"comma-separated, from {every_group()}")
    parser.add_argument("--structures", default="all", help="comma-separated structure names (default all)")


def selection(parser: argparse.ArgumentParser, args) -> tuple[list[str], list[str] | None]:
    """The groups and the structure names (None: all) that ``args`` chose; a parser error for an unknown group."""
    groups = args.groups.split(",")
    if set(groups) - set(every_group()):
        parser.error(f"unknown groups: {', '.join(sorted(set(groups) - set(every_group())))}")
    return groups, None if args.structures == "all" else args.structures.split(",")


def model_and_cache(embeddings: Path):
    """The default model and an embedding cache kept on disk in ``embeddings``."""
    from SegmentWithSAMLib.cache import EmbeddingCache
    from SegmentWithSAMLib.disk_cache import DiskEmbeddingCache
    from SegmentWithSAMLib.loading import load_model

    model = load_model()
    return model, EmbeddingCache(disk=DiskEmbeddingCache.for_model(model, embeddings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_selection(parser)
    parser.add_argument("--steps", type=int, default=CLICK_STEPS, help="click steps after the box (default 5)")
    parser.add_argument("--in-process", action="store_true", help="drive one Segmenter, no process per step")
    parser.add_argument("--no-baselines", action="store_true", help="skip the oracle and one-box propagation")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    parser.add_argument("--skip", type=int, default=0, help="the boxes' skip: slices interpolated between two the "
                        "model segments, which the clicks' walks keep (default 0)")
    parser.add_argument("--box-shift", type=int, default=BOX_SHIFT, choices=range(6), metavar="{0..5}",
                        help="the box's margin in pixels per 256 around the object on its middle slice (the "
                        f"challenge draws it from 0-5 at random; default {BOX_SHIFT})")
    parser.add_argument("--no-box", action="store_true", help="no box: step 0 scores 0 and the first click starts "
                        "the object, as in the challenge's cases that give clicks only")
    parser.add_argument("--cache-dir", type=Path, help="keep the embeddings in (and reuse them from) this folder; "
                        "step 0's seconds then leave out the encoding (default: a fresh folder)")
    args = parser.parse_args()
    groups, names = selection(parser, args)
    work = Path(tempfile.mkdtemp(prefix="interactive3d-"))
    embeddings = args.cache_dir or work / "embeddings"
    model, cache = model_and_cache(embeddings)
    driver = InProcess(model, cache, args.skip) if args.in_process else Subprocess(work, embeddings, args.skip)
    results = {}
    for name, group, image, spacing, truth in all_cases(groups, names):
        result = protocol(driver, image, spacing, truth, args.steps, args.box_shift, boxed=not args.no_box)
        on = np.flatnonzero(truth.any(axis=(1, 2)))
        result["slices"] = int(on[-1] - on[0] + 1)
        result["group"] = group
        if not args.no_baselines:
            result.update(baselines(model, cache, image, spacing, truth, args.box_shift))
        results[name] = result
        print(f"{name}: DSC " + " ".join(f"{d:.3f}" for d in result["dsc"])
              + "; s/step " + " ".join(f"{t['seconds']:.1f}" for t in result["timing"]), flush=True)
    if names is not None and set(names) - set(results):
        parser.error(f"unknown structures (or not in --groups): {', '.join(sorted(set(names) - set(results)))}")

    rows = [_row(name, r) for name, r in results.items()]
    present = [g for g in every_group() if any(r["group"] == g for r in results.values())]
    by_group = {g: {n: r for n, r in results.items() if r["group"] == g} for g in present}
    rows += [_row(f"mean {g}", _mean(rs)) for g, rs in by_group.items() if len(by_group) > 1]
    rows.append(_row("mean", _mean(results)))
    headers = ["structure", "slices", *(f"DSC{s}" for s in range(args.steps + 1)), "DSC_AUC", "NSD final",
               "NSD_AUC", "s step0", "s/click", "CPU s/click", "oracle DSC", "1-box prop DSC"]
    mode = "in process (one Interaction)" if args.in_process else "segmentwithsam cvpr25, a fresh process per step"
    print(f"\nCVPR 2025 interactive 3D protocol, {mode}; model {model.name} ({model.engine}, {model.device}); "
          "whole volumes, axial; " + ("no boxes, clicks only\n" if args.no_box else
                                      f"boxes {args.box_shift} px per 256 beyond the object\n"))
    print_table(headers, rows)
    print("\nNSD per step: " + "; ".join(f"{n} " + " ".join(f"{v:.3f}" for v in r["nsd"]) for n, r in results.items()))
    goals = {"all": targets(results), **{g: targets(rs) for g, rs in by_group.items()}}
    verdict = {True: "met", False: "not met", None: "for information"}
    for group, group_goals in goals.items():
        print(f"\nTargets ({group}): " + "; ".join(
            f"{key} = {round(goal['value'], 3) if isinstance(goal['value'], float) else goal['value']} "
            f"({verdict[goal['met']]})" for key, goal in group_goals.items()))
    payload = {"mode": mode, "model": model.name, "engine": model.engine, "device": str(model.device),
               "steps": args.steps, "skip": args.skip, "box_shift": None if args.no_box else args.box_shift,
               "ct_structures": CT_STRUCTURES,
               "structures": results,
               "targets": goals}
    name = "interactive3d-in-process" if args.in_process else "interactive3d"
    name += f"-skip{args.skip}" if args.skip else ""
    name += f"-shift{args.box_shift}" if args.box_shift != BOX_SHIFT else ""
    name += "-nobox" if args.no_box else ""
    write_json(name, payload, one_line=args.json)

if __name__ == "__main__":
    main()
