"""Suggested clicks against the challenge's: after the box, 5 clicks where the engine suggests
(:mod:`SegmentWithSAMLib.suggest`), each positive where the truth is foreground there and negative elsewhere, as a
user who follows the suggestion would click; beside them the CVPR 2025 protocol's 5 clicks at the centre of the
largest 3D error (which needs the truth). DSC per step, and the share of the protocol's gain that the suggestions
reach: (suggested final − step 0) / (protocol final − step 0), per structure and for the means (issue #30: at
least 0.7). In process (one Segmenter per run), axial, whole volumes; the embeddings go to a disk cache
(``--cache``, default a folder under the system's temporary folder) that later runs reuse.

    python benchmarks/suggest.py [--structures Hippocampus_L,Skull] [--groups aal,ct,dev] [--signals views,ends]

Writes results/suggest.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from interactive3d import CT_STRUCTURES, InProcess, colin_cases, ct_cases, protocol

from SegmentWithSAMLib.challenge import CLICK_STEPS, box_from_truth, score
from SegmentWithSAMLib.data import AAL_STRUCTURES
from SegmentWithSAMLib.errors import PromptError
from SegmentWithSAMLib.suggest import WEIGHTS, suggest

from common import print_table, write_json


def _dev_cases(names: list[str]):
    """The development set's structures (name, image, spacing, truth) when benchmarks/devset.py and its files are
    there (``python benchmarks/devset.py build``), else none."""
    try:
        from devset import devset_cases, load_manifest
    except ImportError:
        return
    try:
        known = [n for case in load_manifest()["cases"] for n in case["structures"]]
    except (OSError, ValueError) as error:
        print(f"The development set is left out: {error}")
        return
    wanted = [n for n in known if not names or n in names]
    for name, _group, image, spacing, truth in devset_cases(names=wanted) if wanted else ():
        yield name, image, spacing, truth


def suggested(model, cache, image, spacing, truth, steps: int, signals) -> dict:
    """The box step, then ``steps`` clicks at the suggestions: DSC per step, each suggestion (voxel (d, h, w),
    the click's sign, hint, reason, whether it lay on an error, seconds) and the refused clicks."""
    driver = InProcess(model, cache)
    prediction, _ = driver.step(image, spacing, box_from_truth(truth), [], None)
    segmenter = driver.segmenter
    dscs, made = [score(truth, prediction, spacing)[0]], []
    for _ in range(steps):
        start = time.perf_counter()
        try:
            suggestion = suggest(segmenter.session, segmenter.axes, segmenter.states["object"], signals)
        except PromptError:  # nothing looks wrong to the signals: the user stops
            made.append(None)
            dscs.append(dscs[-1])
            continue
        seconds = time.perf_counter() - start
        ijk = np.rint(segmenter.axes.pixel_to_ijk(suggestion.index, np.array([suggestion.xy]))[0]).astype(int)
        voxel = (int(ijk[2]), int(ijk[1]), int(ijk[0]))  # (d, h, w): the case's KJI
        positive = bool(truth[voxel])
        entry = {"voxel": list(voxel), "positive": positive, "hint": suggestion.hint, "reason": suggestion.reason,
                 "error": bool(truth[voxel] != prediction[voxel]), "seconds": seconds, "refused": None}
        try:
            segmenter.click("object", suggestion.ras(segmenter.volume, segmenter.axes), positive)
        except PromptError as error:
            entry["refused"] = str(error)
        prediction = segmenter.mask("object")
        made.append(entry)
        dscs.append(score(truth, prediction, spacing)[0])
    return {"dsc": dscs, "suggestions": made}


def gain_ratio(protocol_dsc: list[float], suggested_dsc: list[float]) -> float | None:
    """(suggested final − step 0) / (protocol final − step 0); None when the protocol gained nothing."""
    gain = protocol_dsc[-1] - protocol_dsc[0]
    return None if gain <= 0 else (suggested_dsc[-1] - suggested_dsc[0]) / gain


def cases(names: list[str], groups: set[str]):
    """(group, name, image, spacing, truth) of the chosen structures."""
    if "aal" in groups:
        wanted = [n for n in names if n in AAL_STRUCTURES] if names else list(AAL_STRUCTURES)
        yield from (("aal", *case) for case in colin_cases(wanted))
    if "ct" in groups and (not names or set(names) & set(CT_STRUCTURES)):
        yield from (("ct", *case) for case in ct_cases() if not names or case[0] in names)
    if "dev" in groups:
        yield from (("dev", *case) for case in _dev_cases(names))


def _mean_row(label: str, results: dict) -> list:
    """The table's row of the means over ``results``: DSC0, the finals and the ratio of the mean gains."""
    protocol_mean = np.mean([r["protocol"] for r in results.values()], axis=0)
    suggested_mean = np.mean([r["dsc"] for r in results.values()], axis=0)
    ratio = gain_ratio(list(protocol_mean), list(suggested_mean))
    return [label, protocol_mean[0], protocol_mean[-1], suggested_mean[-1], "" if ratio is None else ratio, "", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", default="", help="comma-separated names (default: all of the groups)")
    parser.add_argument("--groups", default="aal,ct,dev", help="of aal (12 AAL structures), ct (skull, head), dev "
                        "(benchmarks/devset.py, when built); default all")
    parser.add_argument("--signals", default=",".join(WEIGHTS), help=f"of {', '.join(WEIGHTS)} (default all)")
    parser.add_argument("--steps", type=int, default=CLICK_STEPS, help="clicks after the box (default 5)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "segmentwithsam-suggest-embeddings"),
                        help="the disk cache of embeddings (kept between runs)")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args()
    names = [n for n in args.structures.split(",") if n]
    signals = tuple(s for s in args.signals.split(",") if s)
    if set(signals) - set(WEIGHTS):
        parser.error(f"unknown signals: {', '.join(sorted(set(signals) - set(WEIGHTS)))}")

    from SegmentWithSAMLib.cache import EmbeddingCache
    from SegmentWithSAMLib.disk_cache import DiskEmbeddingCache
    from SegmentWithSAMLib.loading import configure_process_threads, load_model

    model = load_model()
    configure_process_threads(model)
    cache = EmbeddingCache(disk=DiskEmbeddingCache.for_model(model, args.cache, max_bytes=16 << 30))
    results = {}
    for group, name, image, spacing, truth in cases(names, set(args.groups.split(","))):
        reference = protocol(InProcess(model, cache), image, spacing, truth, args.steps)
        mine = suggested(model, cache, image, spacing, truth, args.steps, signals)
        results[name] = {"group": group, "protocol": reference["dsc"], "protocol_clicks": reference["clicks"], **mine,
                         "gain_ratio": gain_ratio(reference["dsc"], mine["dsc"])}
        print(f"{name}: protocol " + " ".join(f"{d:.3f}" for d in reference["dsc"]) + "; suggested "
              + " ".join(f"{d:.3f}" for d in mine["dsc"]), flush=True)
    if not results:
        parser.error("no case matches --structures and --groups")

    rows = []
    for name, r in results.items():
        hits = [s["error"] for s in r["suggestions"] if s]
        rows.append([name, r["protocol"][0], r["protocol"][-1], r["dsc"][-1],
                     "" if r["gain_ratio"] is None else r["gain_ratio"], f"{sum(hits)}/{len(r['suggestions'])}",
                     round(float(np.mean([s["seconds"] for s in r["suggestions"] if s] or [0])), 2)])
    groups = sorted({r["group"] for r in results.values()})
    if len(groups) > 1:
        rows += [_mean_row(f"mean {g}", {n: r for n, r in results.items() if r["group"] == g}) for g in groups]
    rows.append(_mean_row("mean", results))
    print(f"\nSuggested clicks vs the protocol's; signals {', '.join(signals)}; model {model.name} ({model.engine}, "
          f"{model.device}); whole volumes, axial, in process\n")
    print_table(["structure", "DSC0", f"protocol DSC{args.steps}", f"suggested DSC{args.steps}", "gain ratio",
                 "on an error", "s/suggestion"], rows)
    means = {row[0]: {"dsc0": row[1], "protocol_final": row[2], "suggested_final": row[3],
                      "gain_ratio": row[4] if row[4] != "" else None} for row in rows if row[0].startswith("mean")}
    payload = {"model": model.name, "engine": model.engine, "device": str(model.device), "steps": args.steps,
               "signals": list(signals), "weights": WEIGHTS, "structures": results, "means": means}
    write_json("suggest", payload, one_line=args.json)


if __name__ == "__main__":
    main()
