"""The ``segmentwithsam`` command line: segment, propagate, evaluate, cvpr25, demo, info.

Every user error prints one line ``segmentwithsam: error: …`` and exits with status 2, leaving no output file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .errors import SegmentWithSAMError
from .release import RELEASE

EXIT_USAGE = 2
OBJECT = "segment"  # the one object that segment and propagate make


def _floats(count: int, what: str):
    def parse(text: str) -> np.ndarray:
        try:
            values = [float(v) for v in text.replace(" ", "").split(",")]
        except ValueError:
            values = []
        if len(values) != count or not np.all(np.isfinite(values)):
            raise argparse.ArgumentTypeError(f"{what} needs {count} comma-separated numbers, not {text!r}")
        return np.array(values)

    return parse


def _click(positive: bool, what: str):
    """A coordinate option's value as (R, A, S array, positive): options sharing a ``dest`` keep their order."""
    parse = _floats(3, what)
    return lambda text: (parse(text), positive)


def _stroke(what: str):
    """A stroke option's value ``R,A,S;R,A,S;…`` as an (N, 3) array of RAS points in the order drawn."""
    parse = _floats(3, what)

    def points(text: str) -> np.ndarray:
        parts = [part for part in text.split(";") if part.strip()]
        try:
            return np.stack([parse(part) for part in parts]) if parts else np.zeros((0, 3))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"{what} needs points R,A,S separated by ';', not {text!r}") from None

    return points


def _correction(kind: str, positive: bool, what: str):
    """A correction option's value as (kind, value, positive): the options sharing a ``dest`` keep their order."""
    parse = _floats(3, what) if kind == "click" else _stroke(what)
    return lambda text: (kind, parse(text), positive)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="litemedsam",
                        help="model name (segmentwithsam models lists them) or checkpoint path (default: litemedsam)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint file for the named model, instead of its own")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--engine", default="auto",
                        help="auto (default: OpenVINO on CPU when installed, else PyTorch), torch, openvino, "
                             "openvino-f32 (no bf16 at all) or openvino-bf16 (faster on bf16 CPUs, less faithful); "
                             "`segmentwithsam info` lists them")
    parser.add_argument("--window", default=None,
                        help="intensity window: auto (0.5-99.5 percentiles), W,L (e.g. 400,40) or a CT preset "
                             "(abdomen, brain, bone, lung, ...)")
    parser.add_argument("--backend", metavar="ADDRESS", default=None,
                        help="segment on a server (segmentwithsam serve) at tcp://HOST:PORT or tls://HOST:PORT, with "
                             "the key in $SEGMENTWITHSAM_KEY; the server's model is used (--model etc. are ignored)")
    parser.add_argument("--cafile", default=None, help="the certificate (PEM) that a TLS server's is checked against, "
                                                       "if the system's CAs do not know it")


def _add_propagation_options(parser: argparse.ArgumentParser, with_direction: bool) -> None:
    from .propagation import StopRules

    defaults = StopRules()
    group = parser.add_argument_group("propagation")
    if with_direction:
        group.add_argument("--direction", choices=["up", "down", "both"], default="both",
                           help="up = increasing slice index (default both)")
    group.add_argument("--range", default=None, metavar="A:B",
                       help="slice range to stay in (default: all); with --box a 3D box, filled throughout unless "
                            "the model finds nothing")
    group.add_argument("--min-similarity", type=float, default=defaults.min_similarity,
                       help=f"stop when the mask's appearance similarity to the seed drops below this "
                            f"(default {defaults.min_similarity}; -1 = off)")
    group.add_argument("--min-score", type=float, default=defaults.min_score,
                       help=f"stop below this predicted quality (default {defaults.min_score}; -1 = off)")
    group.add_argument("--max-area-ratio", type=float, default=defaults.max_area_ratio,
                       help=f"stop when the area changes by more than this factor (default {defaults.max_area_ratio}; "
                            "0 = off)")
    group.add_argument("--min-overlap", type=float, default=defaults.min_overlap,
                       help=f"stop below this Dice with the previous slice (default {defaults.min_overlap}; -1 = off)")
    group.add_argument("--max-empty", type=int, default=defaults.max_empty,
                       help=f"stop after this many empty slices in a row (default {defaults.max_empty})")
    group.add_argument("--skip", type=int, default=0, metavar="N",
                       help="segment every (N+1)-th slice with the model and interpolate the N between: about "
                            "1.9x faster with N=2 on a CPU, slightly lower Dice (default 0: every slice)")


def _auto_or_int(text: str) -> int | None:
    """``--skip`` of cvpr25: None for "auto", else a whole number from 0 to MAX_SKIP."""
    from .propagation import MAX_SKIP

    if text == "auto":
        return None
    if not text.isdigit() or int(text) > MAX_SKIP:
        raise argparse.ArgumentTypeError(f"give a whole number from 0 to {MAX_SKIP} or auto, not {text!r}")
    return int(text)


def _load_model(args: argparse.Namespace):
    """The model the options name; the command is a process's entry point, so it sets PyTorch's threads for
    the engine the model runs on (here and nowhere else in the command)."""
    from .loading import configure_process_threads, load_model

    model = load_model(args.model, args.device, args.engine, args.checkpoint)
    configure_process_threads(model)
    return model


def _segmenter(args: argparse.Namespace, volume):
    """The :class:`~.api.Segmenter` the options ask for: the model in this process (its embeddings kept on disk
    for the next command on the same volume), or a server's."""
    from .api import Segmenter
    from .cache import command_cache

    if args.backend is None:
        model = _load_model(args)
        return Segmenter(volume, model, args.view, window=args.window, cache=command_cache(model))
    import atexit

    from .backend.client import BackendClient

    client = BackendClient(server=args.backend, cafile=args.cafile, dispatch="poll")
    atexit.register(client.close)  # ends the session on the server
    return Segmenter(volume, view=args.view, window=args.window, backend=client)


def _propagate(segmenter, index: int, direction: str, args, slice_range=None) -> dict:
    """Propagate the object from slice ``index``; a report of what happened."""
    from tqdm import tqdm

    from .propagation import StopRules

    rules = StopRules.from_options(args.min_similarity, args.min_score, args.max_area_ratio, args.min_overlap,
                                   args.max_empty)
    quiet = True if args.json else None  # tqdm: None = show only on a terminal
    with tqdm(desc="propagating", unit="slice", file=sys.stderr, leave=False, disable=quiet) as bar:
        update = segmenter.propagate(OBJECT, index, direction, slice_range, rules, args.skip,
                                     on_slice=lambda *_: bar.update())
    return {"slices": len(update.changed), "stopped": update.stopped,
            "slices_per_s": round(len(update.changed) / max(update.seconds, 1e-9), 2)}


def cmd_models(args: argparse.Namespace) -> dict:
    from .download import download
    from .models import registry

    models = registry()
    if args.download:
        if args.download not in models:
            raise SegmentWithSAMError(f"Unknown model {args.download!r}: use one of {', '.join(sorted(models))}.")
        download(models[args.download], progress=not args.json)
    rows = []
    for entry in models.values():
        status = "installed: " + str(entry.path) if entry.installed else (
            f"not installed ({entry.size / 1e6:.0f} MB; --download {entry.name})" if entry.url
            else f"not installed ({entry.manual_install}, or --checkpoint PATH)")
        rows.append({"name": entry.name, "architecture": entry.architecture, "input_size": entry.input_size,
                     "licence": entry.licence, "installed": entry.installed, "status": status})
    return {"models": rows}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segmentwithsam",
                                     description="Prompt-driven segmentation of medical volumes with SAM models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {RELEASE}")
    commands = parser.add_subparsers(dest="command", required=True)

    seg = commands.add_parser("segment", help="segment one slice from points and/or a box in RAS millimetres")
    seg.add_argument("volume", help="NIfTI, NRRD or MHA file, or a DICOM series folder")
    seg.add_argument("--view", required=True, choices=["axial", "coronal", "sagittal"])
    seg.add_argument("--point", dest="points", action="append", default=[], type=_click(True, "--point"),
                     metavar="R,A,S", help="positive point (repeatable; points are clicks in the order given)")
    seg.add_argument("--negative", dest="points", action="append", type=_click(False, "--negative"),
                     metavar="R,A,S", help="negative point (repeatable)")
    seg.add_argument("--box", type=_floats(6, "--box"), metavar="R1,A1,S1,R2,A2,S2",
                     help="two opposite corners of a box")
    seg.add_argument("--lasso", type=_stroke("--lasso"), metavar="R,A,S;R,A,S;...",
                     help="a closed outline on one slice instead of points and a box (its last point joins the first)")
    _add_model_options(seg)
    seg.add_argument("--out", required=True, help="labelmap to write: .nii.gz, .nrrd, .mha or .seg.nrrd")
    seg.add_argument("--name", default="Segment_1", help="segment name in a .seg.nrrd file")
    seg.add_argument("--propagate", choices=["up", "down", "both"], default=None,
                     help="then propagate the mask through the volume this way")
    seg.add_argument("--click", dest="corrections", action="append", default=[],
                     type=_correction("click", True, "--click"), metavar="R,A,S",
                     help="then a positive click anywhere, correcting the 3D mask (repeatable; corrections apply in "
                          "the order given)")
    seg.add_argument("--click-negative", dest="corrections", action="append",
                     type=_correction("click", False, "--click-negative"), metavar="R,A,S",
                     help="then a negative click anywhere")
    seg.add_argument("--scribble", dest="corrections", action="append",
                     type=_correction("scribble", True, "--scribble"), metavar="R,A,S;R,A,S;...",
                     help="then a positive scribble on one slice of any view (alone: it starts the object)")
    seg.add_argument("--scribble-negative", dest="corrections", action="append",
                     type=_correction("scribble", False, "--scribble-negative"), metavar="R,A,S;R,A,S;...",
                     help="then a negative scribble")
    seg.add_argument("--keep", metavar="LABELMAP[:L1,L2,...]", default=None,
                     help="voxels the new object never takes: a labelmap on the volume's grid (all its labels, or "
                          "those listed), e.g. finished structures")
    seg.add_argument("--lasso-negative", dest="corrections", action="append",
                     type=_correction("lasso", False, "--lasso-negative"), metavar="R,A,S;R,A,S;...",
                     help="then remove a closed outline's inside (and what continues it on the neighbouring slices)")

    prop = commands.add_parser("propagate", help="propagate a mask on one slice through the volume")
    prop.add_argument("volume", help="image volume (as for segment)")
    prop.add_argument("--mask", required=True, help="labelmap on the volume's grid with the seed on one slice")
    prop.add_argument("--label", type=int, default=None, help="label value of the seed (default: any non-zero)")
    prop.add_argument("--view", required=True, choices=["axial", "coronal", "sagittal"])
    prop.add_argument("--out", required=True, help="labelmap to write (seed and propagated slices)")
    _add_model_options(prop)
    for parser_ in (seg, prop):
        _add_propagation_options(parser_, with_direction=parser_ is prop)

    evaluate = commands.add_parser("evaluate", help="simulate clicks against a label: Dice per click, NoC@80/85/90")
    evaluate.add_argument("volume", help="image volume (as for segment)")
    evaluate.add_argument("--labels", required=True, help="labelmap on the volume's grid")
    evaluate.add_argument("--label", required=True, type=int, help="label value of the structure")
    evaluate.add_argument("--view", default="axial", choices=["axial", "coronal", "sagittal"])
    evaluate.add_argument("--slice", type=int, default=None, help="slice index (default: the label's middle slice)")
    evaluate.add_argument("--clicks", type=int, default=20, help="click budget (default 20)")
    _add_model_options(evaluate)

    demo = commands.add_parser("demo", help="LiteMedSAM on the Colin27 MRI: left hippocampus from a box")
    demo.add_argument("--out-dir", default="segmentwithsam-demo", help="folder for the outputs")
    demo.add_argument("--device", default="auto")

    cvpr25 = commands.add_parser("cvpr25", help="CVPR 2025 interactive 3D challenge format: predict every *.npz "
                                 "of INPUT_DIR (boxes, clicks) into OUTPUT_DIR (segs)")
    cvpr25.add_argument("input_dir", help="folder of challenge .npz files (imgs, spacing, boxes, clicks, ...)")
    cvpr25.add_argument("output_dir", help="folder for the predictions: <same name>.npz with segs (D, H, W) uint8")
    cvpr25.add_argument("--skip", type=_auto_or_int, default=None, metavar="N|auto",
                        help="slices interpolated between two the model segments when a box propagates (0-4); "
                             "auto (default): 0 unless encoding every slice of the boxes would take more than "
                             "its share of the challenge's time budget")
    _add_model_options(cvpr25)

    from .batch.command import add_arguments as add_batch_arguments

    batch = commands.add_parser("batch", help="segment a cohort: one object per manifest row, as tasks on a Dask "
                                "cluster (local by default), resumable; writes DIR/report.csv")
    add_batch_arguments(batch)
    _add_model_options(batch)
    _add_propagation_options(batch, with_direction=True)

    commands.add_parser("serve", add_help=False,
                        help="serve the model to clients on other machines: --host, --port, TLS, a key (--help)")
    commands.add_parser("web", add_help=False,
                        help="the same tool in a web browser (pip install segmentwithsam[web]; --help)")

    models = commands.add_parser("models", help="the models this knows, and which are installed")
    models.add_argument("--download", metavar="NAME", help="download NAME's checkpoint (SHA-256 checked, resumable)")
    info = commands.add_parser("info", help="versions, device, models and cache settings")
    for command in (seg, prop, evaluate, demo, cvpr25, models, info):
        command.add_argument("--json", action="store_true", help="print one JSON object on one line")
    return parser


def cmd_segment(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    from .actions import click_from_ras, parse_slice_range, prompt_from_ras, stroke_from_ras
    from .geometry import slice_axes
    from .io import check_writable, read_kept_voxels, read_volume, write_labelmap

    started = any(positive for _, positive in args.points) or args.box is not None
    if args.lasso is not None and (args.points or args.box is not None):
        raise SegmentWithSAMError("Start with a --lasso or with points and a box, not both.")
    if not started and args.lasso is None and not (args.corrections and args.corrections[0][0] == "scribble"
                                                   and args.corrections[0][2]):
        raise SegmentWithSAMError("Give at least one --point, a --box, a --lasso or a positive --scribble (negative "
                                  "points alone select nothing).")
    slice_range = parse_slice_range(args.range)
    check_writable(args.out, labelmap=True)
    timings: dict[str, float] = {}
    with tqdm(total=4, disable=True if args.json else None, file=sys.stderr, leave=False,
              bar_format="{desc} {bar} {n_fmt}/{total_fmt}") as bar:
        start = time.perf_counter()
        bar.set_description("reading volume")
        volume = read_volume(args.volume)
        # every prompt is checked (inside the volume, on one slice) before the model loads
        axes = slice_axes(volume, args.view)
        points = np.array([p for p, _ in args.points]).reshape(-1, 3)
        labels = np.array([int(positive) for _, positive in args.points])
        if started:
            prompt = prompt_from_ras(volume, axes, points, labels, None if args.box is None else args.box.reshape(2, 3),
                                     slice_range if args.propagate else None)
        elif args.lasso is not None:
            prompt = stroke_from_ras(volume, axes, args.lasso, closed=True)
        corrections = [click_from_ras(volume, axes, value, positive) if kind == "click" else
                       stroke_from_ras(volume, axes, value, positive, closed=kind == "lasso")
                       for kind, value, positive in args.corrections]
        if not started and args.lasso is None:  # a positive scribble starts the object
            prompt, corrections = corrections[0], corrections[1:]
        kept = None if args.keep is None else read_kept_voxels(args.keep, volume, args.volume)
        bar.update()
        bar.set_description("loading model" if args.backend is None else "connecting")
        t = time.perf_counter()
        segmenter = _segmenter(args, volume)
        timings["load_model"] = (time.perf_counter() - t) * 1e3
        if kept is not None:
            segmenter.keep_out(OBJECT, kept)
        bar.update()
        bar.set_description("segmenting")
        first = segmenter.step(OBJECT, prompt)
        index = prompt.index
        timings["segment"] = first.seconds * 1e3
        bar.update()
        extra: dict = {"notices": list(first.notices)}
        if args.propagate:
            t = time.perf_counter()
            extra.update(_propagate(segmenter, index, args.propagate, args, slice_range if not started else None))
            timings["propagate"] = (time.perf_counter() - t) * 1e3
        for correction in corrections:
            extra["notices"] += segmenter.step(OBJECT, correction).notices
        mask = segmenter.mask(OBJECT)
        bar.set_description("writing")
        t = time.perf_counter()
        write_labelmap(mask, volume, args.out, name=args.name)
        timings["write"] = (time.perf_counter() - t) * 1e3
        timings["total"] = (time.perf_counter() - start) * 1e3
        bar.update()
    return {"voxels": int(mask.sum()), "slice": index, "view": segmenter.axes.view.value, **segmenter.describe(),
            "out": str(Path(args.out)), "ms": {k: round(v, 1) for k, v in timings.items()}, **extra}


def cmd_propagate(args: argparse.Namespace) -> dict:
    from .actions import UserEdit, parse_slice_range
    from .geometry import seed_slice
    from .io import check_writable, read_labelmap_on, read_volume, write_labelmap

    check_writable(args.out, labelmap=True)
    slice_range = parse_slice_range(args.range)
    start = time.perf_counter()
    volume = read_volume(args.volume)
    seed = read_labelmap_on(args.mask, volume, args.volume)
    segmenter = _segmenter(args, volume)
    index, mask2d = seed_slice(segmenter.axes, seed.array, args.label, args.mask)
    segmenter.step(OBJECT, UserEdit({index: mask2d}))
    report = _propagate(segmenter, index, args.direction, args, slice_range)
    mask = segmenter.mask(OBJECT)
    write_labelmap(mask, volume, args.out)
    report.update({"seed_slice": index, "voxels": int(mask.sum()), "view": segmenter.axes.view.value,
                   **segmenter.describe(), "out": str(Path(args.out)),
                   "ms": round((time.perf_counter() - start) * 1e3, 1)})
    return report


_COORDINATE_OPTIONS = ("--point", "--negative", "--box", "--click", "--click-negative")


def _join_coordinates(argv: list[str]) -> list[str]:
    """``--point -12,3,4`` → ``--point=-12,3,4``: argparse would take a value starting with '-' for an option."""
    out: list[str] = []
    values = iter(argv)
    for arg in values:
        out.append(f"{arg}={next(values, '')}" if arg in _COORDINATE_OPTIONS else arg)
    return out


def cmd_evaluate(args: argparse.Namespace) -> dict:
    from .actions import Prompt
    from .errors import PromptError
    from .geometry import slices_with
    from .io import read_labelmap_on, read_volume
    from .metrics import clicks_to_reach
    from .refinement import run_clicks

    if args.clicks < 1:
        raise PromptError(f"--clicks must be at least 1, not {args.clicks}.")
    volume = read_volume(args.volume)
    labels = read_labelmap_on(args.labels, volume, args.volume)
    segmenter = _segmenter(args, volume)
    axes = segmenter.axes
    truth = axes.oriented(labels.array == args.label)
    present = slices_with(axes, labels.array == args.label)
    if not len(present):
        raise PromptError(f"Label {args.label} does not occur in {args.labels}.")
    index = int(present[len(present) // 2]) if args.slice is None else args.slice
    if not 0 <= index < axes.num_slices or not truth[index].any():
        raise PromptError(f"Label {args.label} is not on {args.view} slice {index}; it is on slices "
                          f"{present.min()} to {present.max()}.")
    start = time.perf_counter()
    clicks: list[tuple[float, float, bool]] = []

    def click(xy, positive: bool) -> np.ndarray:  # each click one 2D prompt step: all clicks so far, in order
        clicks.append((float(xy[0]), float(xy[1]), bool(positive)))
        return segmenter.step(OBJECT, Prompt(index, None, tuple(clicks))).changed[index]

    dices = run_clicks(click, truth[index], args.clicks)
    report = {f"noc{t}": clicks_to_reach(dices, t / 100) for t in (80, 85, 90)}
    report.update({"dice_per_click": [round(d, 4) for d in dices], "label": args.label, "view": axes.view.value,
                   "slice": index, "clicks": args.clicks, "model": segmenter.describe()["model"],
                   "ms": round((time.perf_counter() - start) * 1e3, 1)})
    return report


def _web(argv: list[str]) -> int:
    """``segmentwithsam web``: the web app, imported only now (the core never imports trame)."""
    try:
        from SegmentWithSAMWeb.app import main as web
    except ImportError as exc:
        print(f"segmentwithsam: error: the web app needs its extra ({exc.name or exc} is missing): "
              "pip install segmentwithsam[web]", file=sys.stderr)
        return EXIT_USAGE
    try:
        return web(argv)
    except SegmentWithSAMError as exc:
        print(f"segmentwithsam: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        from .backend.server import main as serve

        serve(argv[1:])
    if argv[:1] == ["web"]:
        return _web(argv[1:])
    parser = build_parser()
    args = parser.parse_args(_join_coordinates(argv))
    try:
        if args.command == "segment":
            report = cmd_segment(args)
            text = "\n".join([*report["notices"], f"Segmented {report['voxels']} voxels on {report['view']} slice "
                               f"{report['slice']} in {report['ms']['total']:.0f} ms on {report['device']}; wrote "
                               f"{report['out']}"])
        elif args.command == "propagate":
            report = cmd_propagate(args)
            text = (f"Propagated from {report['view']} slice {report['seed_slice']} to {report['slices']} more slices "
                    f"({report['slices_per_s']} slices/s); stopped: "
                    + ", ".join(f"{k}: {v}" for k, v in report["stopped"].items()) + f"; wrote {report['out']}")
        elif args.command == "evaluate":
            report = cmd_evaluate(args)
            text = (f"Label {report['label']}, {report['view']} slice {report['slice']}: Dice per click "
                    + " ".join(f"{d:.2f}" for d in report["dice_per_click"])
                    + f"\nNoC@80 {report['noc80']}, NoC@85 {report['noc85']}, NoC@90 {report['noc90']} "
                    f"(budget {report['clicks']}; budget + 1 = never reached)")
        elif args.command == "cvpr25":
            from .cvpr25 import cmd_cvpr25

            return cmd_cvpr25(args)
        elif args.command == "batch":
            from .batch.command import cmd_batch

            return cmd_batch(args)
        elif args.command == "models":
            report = cmd_models(args)
            text = "\n".join(f"{m['name']:<16} {m['architecture']:<15} {m['input_size']:>5}  {m['status']}"
                             for m in report["models"])
        elif args.command == "demo":
            from .demo import run_demo

            report = run_demo(Path(args.out_dir), args.device)
            text = report.pop("text")
        else:
            from .demo import system_info

            report = system_info()
            text = "\n".join(f"{key}: {value}" for key, value in report.items())
    except SegmentWithSAMError as exc:
        print(f"segmentwithsam: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(report, separators=(",", ":")) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
