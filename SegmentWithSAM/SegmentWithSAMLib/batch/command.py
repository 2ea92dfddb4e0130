"""``segmentwithsam batch MANIFEST --out DIR``: the command line's options as the rows' defaults, the run, the
summary line and the exit status (0 every row done, 1 some failed; a bad manifest exits 2 through the CLI)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import ManifestError
from .manifest import Options, read_manifest
from .run import run_batch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The batch command's own arguments (the model and propagation options are the other commands')."""
    parser.add_argument("manifest", help="CSV or JSON-lines file, one row per object (columns: docs/batch.md)")
    parser.add_argument("--out", required=True, help="folder for the outputs, report.csv/.json and the resume records")
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="a running Dask scheduler, tcp://HOST:PORT (default: a local cluster on this machine)")
    parser.add_argument("--workers", type=int, default=None,
                        help="local worker processes (default: one per CPU core, or one per GPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU cores of each local worker (default: the cores shared out among the workers)")
    parser.add_argument("--group", action="store_true",
                        help="rows of a volume without an output column go into one multi-label DIR/<volume>.nii.gz")
    parser.add_argument("--keep", metavar="LABELMAP[:L1,L2,...]", default=None,
                        help="voxels no row's object takes: a labelmap on each volume's grid (all its labels, or "
                             "those listed); a row's keep column overrides it")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object on one line")


def cmd_batch(args: argparse.Namespace) -> int:
    """Run the manifest; print the summary (and each failed row); 0 when every row succeeded, else 1."""
    if args.range is not None:
        raise ManifestError("--range is a row's own: give it in the manifest's range column.")
    defaults = Options(model=args.model, checkpoint=args.checkpoint and str(Path(args.checkpoint).resolve()),
                       device=args.device, engine=args.engine, window=args.window, direction=args.direction,
                       skip=args.skip, min_similarity=args.min_similarity, min_score=args.min_score,
                       max_area_ratio=args.max_area_ratio, min_overlap=args.min_overlap, max_empty=args.max_empty,
                       keep=args.keep and str(Path(args.keep).resolve()), backend=args.backend,
                       cafile=args.cafile and str(Path(args.cafile).resolve()))
    manifest = Path(args.manifest)
    report = run_batch(read_manifest(manifest), args.out, base=manifest.parent, defaults=defaults, group=args.group,
                       scheduler=args.scheduler, workers=args.workers, threads=args.threads, progress=not args.json,
                       log=lambda text: print(text, file=sys.stderr), source=str(manifest))
    summary = report.summary
    if args.json:
        print(json.dumps(summary, separators=(",", ":")))
    else:
        for row in report.failed:
            print(f"row {row['row']} ({row['name']}): {row['error']}")
        print(f"{summary['ok']} of {summary['rows']} rows done ({summary['resumed']} by an earlier run), "
              f"{summary['failed']} failed, in {summary['seconds']:.1f} s; report: {summary['report'][0]}")
    return report.exit_status
