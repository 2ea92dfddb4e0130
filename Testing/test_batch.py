"""The batch: a small cohort (Colin27 crops, one reoriented into NRRD, a head CT crop as MHA) on real Dask
processes: outputs voxel for voxel those of `segment`/`propagate`, bad rows failing alone, resuming after
SIGKILL, a real `dask scheduler` with two `dask worker`s one of which is killed mid-task, malformed manifests.

Every row propagates over two slices only, and with OpenVINO's bf16 engine (a third faster to encode than the
default; the batch and the single-case commands run the same engine), to keep the run short on two cores.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SegmentWithSAMLib.batch import Options, read_manifest, run_batch
from SegmentWithSAMLib.batch.records import RECORDS
from SegmentWithSAMLib.cli import main
from SegmentWithSAMLib.data import AAL_STRUCTURES
from SegmentWithSAMLib.geometry import Volume, slice_axes
from SegmentWithSAMLib.io import write_volume

from conftest import middle_slice, reoriented_volume, structure_box_ras

DASK = Path(sys.executable).with_name("dask")
ENGINE = "openvino-bf16"


def _crop(volume: Volume, k: slice, j: slice, i: slice) -> Volume:
    shift = np.eye(4)
    shift[:3, 3] = [i.start, j.start, k.start]
    return Volume(np.ascontiguousarray(volume.array[k, j, i]), volume.ijk_to_ras @ shift)


def _text(values) -> str:
    return ",".join(f"{v:.3f}" for v in np.ravel(values))


def _write_manifest(path: Path, rows: list[dict]) -> Path:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _labels(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, colin, atlas, cranium):
    """Volumes, manifests and each good row's single-case result (written by `segment`/`propagate`)."""
    folder = tmp_path_factory.mktemp("cohort")
    crop_a = (slice(40, 90), slice(80, 140), slice(45, 90))
    colin_a, atlas_a = _crop(colin, *crop_a), _crop(atlas, *crop_a)
    write_volume(colin_a, folder / "colin_a.nii.gz")
    write_volume(atlas_a, folder / "aal_a.nii.gz")
    crop_b = (slice(55, 95), slice(100, 155), slice(88, 130))
    colin_b = reoriented_volume(_crop(colin, *crop_b), (1, 2, 0), (True, False, True))
    atlas_b = reoriented_volume(_crop(atlas, *crop_b), (1, 2, 0), (True, False, True))
    write_volume(colin_b, folder / "colin_b.nrrd")
    axes_b = slice_axes(colin_b, "axial")
    seed_index, seed_mask = middle_slice(atlas_b, axes_b, "Putamen_R")
    seed = np.zeros(axes_b.oriented(atlas_b.array).shape, np.uint8)
    seed[seed_index][seed_mask] = AAL_STRUCTURES["Putamen_R"]
    seed_kji = np.zeros(atlas_b.array.shape, np.uint8)
    axes_b.oriented(seed_kji)[...] = seed
    write_volume(Volume(seed_kji, colin_b.ijk_to_ras), folder / "seed_b.nrrd")
    ct = _crop(cranium, slice(40, 70), slice(60, 200), slice(60, 200))
    write_volume(ct, folder / "ct.mha")

    axial_a, coronal_a = slice_axes(colin_a, "axial"), slice_axes(colin_a, "coronal")
    hippo_index, hippo_box = structure_box_ras(colin_a, atlas_a, axial_a, "Hippocampus_L")
    amyg_index, amyg_truth = middle_slice(atlas_a, coronal_a, "Amygdala_L")
    inside = np.argwhere(amyg_truth)[len(np.argwhere(amyg_truth)) // 2][::-1].astype(float)  # (x, y) pixel
    amyg_point = colin_a.to_ras(coronal_a.pixel_to_ijk(amyg_index, inside[None]))[0]
    ct_axes = slice_axes(ct, "axial")
    ct_box = ct.to_ras(ct_axes.pixel_to_ijk(15, np.array([[35.0, 35.0], [105.0, 105.0]])))
    good = [
        {"volume": "colin_a.nii.gz", "name": "Hippocampus_L", "view": "axial", "box": _text(hippo_box),
         "range": f"{hippo_index}:{hippo_index + 1}", "output": "colin_a_labels.nii.gz",
         "reference": "aal_a.nii.gz", "reference_label": 37},
        {"volume": "colin_a.nii.gz", "name": "Amygdala_L", "view": "coronal", "points": _text(amyg_point),
         "range": f"{amyg_index - 1}:{amyg_index}", "output": "colin_a_labels.nii.gz"},
        {"volume": "colin_b.nrrd", "name": "Putamen_R", "view": "axial", "seed": "seed_b.nrrd",
         "label": AAL_STRUCTURES["Putamen_R"], "range": f"{seed_index}:{seed_index + 1}"},
        {"volume": "ct.mha", "name": "head", "view": "axial", "box": _text(ct_box), "range": "15:16",
         "window": "brain"},
    ]
    bad = [
        {"volume": "missing.nii.gz", "name": "nothing", "view": "axial", "box": _text(hippo_box)},
        {"volume": "colin_a.nii.gz", "name": "outside", "view": "axial", "box": "500,500,0,510,510,0"},
        {"volume": "colin_a.nii.gz", "name": "no_model", "view": "axial", "box": _text(hippo_box),
         "model": "no-such-model"},
    ]
    references = {}
    commands = {
        "Hippocampus_L": ["segment", "--box", good[0]["box"], "--propagate", "both"],
        "Amygdala_L": ["segment", "--point", good[1]["points"], "--propagate", "both"],
        "Putamen_R": ["propagate", "--mask", folder / "seed_b.nrrd", "--label", good[2]["label"]],
        "head": ["segment", "--box", good[3]["box"], "--propagate", "both", "--window", "brain"],
    }
    for row in good:
        out = folder / f"reference_{row['name']}.nii.gz"
        command, *options = commands[row["name"]]
        argv = [command, folder / row["volume"], "--view", row["view"], *options, "--range", row["range"],
                "--engine", ENGINE, "--out", out, "--json"]
        assert main([str(a) for a in argv]) == 0
        references[row["name"]] = _labels(out) > 0
    assert all(mask.any() for mask in references.values())
    return {"folder": folder, "good": good, "bad": bad, "references": references,
            "manifest": _write_manifest(folder / "cohort.csv", good + bad),
            "good_manifest": _write_manifest(folder / "good.csv", good)}


def _assert_outputs_match(cohort, out: Path) -> None:
    """Every good row's output in ``out`` equals its single-case result, voxel for voxel."""
    refs = cohort["references"]
    labels = _labels(out / "colin_a_labels.nii.gz")
    np.testing.assert_array_equal(labels == 1, refs["Hippocampus_L"])
    np.testing.assert_array_equal(labels == 2, refs["Amygdala_L"] & ~refs["Hippocampus_L"])  # the first row keeps
    np.testing.assert_array_equal(_labels(out / "colin_b_Putamen_R.nii.gz") > 0, refs["Putamen_R"])
    np.testing.assert_array_equal(_labels(out / "ct_head.nii.gz") > 0, refs["head"])
    assert not [p for p in out.rglob(".*") if p.name != RECORDS], "temporary files were left"


def _rows(folder: Path) -> list[dict]:
    with open(folder / "report.csv", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def _state(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*")
            if p.is_file() and not p.name.startswith("report.")}


def test_cohort_on_a_local_cluster_then_a_second_run_does_nothing(cohort, capsys):
    folder = cohort["folder"]
    code = main(["batch", str(cohort["manifest"]), "--out", str(folder / "out"), "--workers", "2", "--engine", ENGINE])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    _assert_outputs_match(cohort, folder / "out")
    rows = {r["name"]: r for r in _rows(folder / "out")}
    assert [r["status"] for r in rows.values()] == ["ok"] * 4 + ["failed"] * 3
    assert "missing.nii.gz does not exist" in rows["nothing"]["error"]
    assert "outside the volume" in rows["outside"]["error"]
    assert "Unknown model 'no-such-model'" in rows["no_model"]["error"]
    assert "row 6 (outside)" in captured.out and "4 of 7 rows done" in captured.out
    hippo = rows["Hippocampus_L"]
    assert int(hippo["voxels"]) == cohort["references"]["Hippocampus_L"].sum() and hippo["label"] == "1"
    assert float(hippo["volume_ml"]) == pytest.approx(int(hippo["voxels"]) / 1000)  # 1 mm voxels
    assert hippo["slices"] == "2" and "range end" in hippo["stopped"] and 0 < float(hippo["dice"]) < 1
    assert rows["Amygdala_L"]["label"] == "2" and rows["Amygdala_L"]["dice"] == ""
    summary = json.loads((folder / "out" / "report.json").read_text(encoding="utf-8"))["summary"]
    assert summary["workers"] == 2 and summary["model_loads"] >= 1 and summary["encoder_runs"] > 0

    before = _state(folder / "out")
    report = run_batch(read_manifest(cohort["manifest"]), folder / "out", base=folder, workers=1,
                       defaults=Options(engine=ENGINE))
    assert report.exit_status == 1 and report.summary["model_loads"] == report.summary["encoder_runs"] == 0
    assert [r["resumed"] for r in report.rows] == [True] * 4 + [False] * 3
    assert [r["status"] for r in report.rows] == ["ok"] * 4 + ["failed"] * 3
    assert _state(folder / "out") == before  # no output or record rewritten


def _living(group: int) -> list[int]:
    """The processes of a process group that are not zombies."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_text(encoding="utf-8").rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == group and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _kill_group(group: int) -> None:
    """SIGKILL every process of the process group and wait until none is left."""
    deadline = time.monotonic() + 30
    while _living(group) and time.monotonic() < deadline:
        os.killpg(group, signal.SIGKILL)
        time.sleep(0.1)
    assert not _living(group)


def test_a_run_killed_with_sigkill_resumes(cohort):
    folder, out = cohort["folder"], cohort["folder"] / "killed"
    command = [sys.executable, "-m", "SegmentWithSAMLib.cli", "batch", str(cohort["good_manifest"]), "--out",
               str(out), "--workers", "1", "--engine", ENGINE, "--json"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list((out / RECORDS).glob("*.json")) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
        assert process.poll() is None, "the run ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        _kill_group(process.pid)  # its workers too, at once (as when the machine goes down)
    done_before = len(list((out / RECORDS).glob("*.json")))
    assert 1 <= done_before < 4
    report = run_batch(read_manifest(cohort["good_manifest"]), out, base=folder, workers=1,
                       defaults=Options(engine=ENGINE))
    assert report.exit_status == 0
    assert sum(r["resumed"] for r in report.rows) == done_before
    _assert_outputs_match(cohort, out)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_one_mid_task(address: str, killed: list) -> None:
    """SIGKILL the worker process running a batch task, 2 s into it (loading the model or encoding)."""
    from distributed import Client

    with Client(address, timeout="60s") as watcher:
        seen, deadline = {}, time.monotonic() + 240
        while not killed and time.monotonic() < deadline:
            for worker, keys in watcher.processing().items():
                for key in (k for k in keys if str(k).startswith("segment-")):
                    if time.monotonic() - seen.setdefault(key, time.monotonic()) > 2.0:
                        pid = watcher.run(os.getpid, workers=[worker])[worker]
                        os.kill(pid, signal.SIGKILL)
                        killed.append(key)
                        return
            time.sleep(0.1)


def test_a_dask_scheduler_and_two_dask_workers_one_killed_mid_task(cohort, tmp_path, capsys):
    from distributed import Client

    address = f"tcp://127.0.0.1:{_free_port()}"
    logs = [open(tmp_path / f"{name}.log", "w") for name in ("scheduler", "worker1", "worker2")]
    processes = [subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                                   "--no-dashboard"], stdout=logs[0], stderr=subprocess.STDOUT)]
    killed: list = []
    try:
        for i in (1, 2):
            processes.append(subprocess.Popen([DASK, "worker", address, "--nthreads", "1", "--host", "127.0.0.1",
                                               "--no-dashboard", "--name", f"w{i}"],
                                              stdout=logs[i], stderr=subprocess.STDOUT))
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
        killer = threading.Thread(target=_kill_one_mid_task, args=(address, killed), daemon=True)
        killer.start()
        manifest = _write_manifest(cohort["folder"] / "two.csv", cohort["good"][2:])  # two volumes: two tasks
        code = main(["batch", str(manifest), "--out", str(tmp_path / "out"), "--scheduler", address,
                     "--engine", ENGINE, "--json"])
        summary = json.loads(capsys.readouterr().out)
        killer.join(5)
    finally:
        for process in processes[::-1]:
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        for log in logs:
            log.close()
    assert killed, "no task was seen running"
    assert code == 0 and summary["ok"] == 2 and summary["workers"] == 2 and summary["tasks"] == 2, summary
    assert summary["scheduler"] == address
    refs = cohort["references"]
    np.testing.assert_array_equal(_labels(tmp_path / "out" / "colin_b_Putamen_R.nii.gz") > 0, refs["Putamen_R"])
    np.testing.assert_array_equal(_labels(tmp_path / "out" / "ct_head.nii.gz") > 0, refs["head"])
    assert not [p for p in (tmp_path / "out").rglob(".*") if p.name != RECORDS], "temporary files were left"


GOOD = {"volume": "v.nii.gz", "name": "a", "view": "axial", "box": "1,2,3,4,5,3"}


@pytest.mark.parametrize("rows, expected", [
    ([{**GOOD, "box": "1,2,3"}], "row 1, field box: needs 6 comma-separated numbers"),
    ([GOOD, {**GOOD, "name": "b", "view": "sideways"}], "row 2, field view: Unknown view 'sideways'"),
    ([{k: v for k, v in GOOD.items() if k != "view"}], "row 1, field view: is required"),
    ([{**GOOD, "colour": "red"}], "row 1, field colour: unknown column"),
    ([{**GOOD, "range": "3-5"}], "row 1, field range: range needs A:B"),
    ([{**GOOD, "label": "3"}], "row 1, field label: is the seed's label value"),
    ([{**GOOD, "box": "", "negatives": "1,2,3"}], "row 1, field box: give a box or points"),
    ([{**GOOD, "points": "1,2,3;4,5"}], "row 1, field points: needs 3 comma-separated numbers"),
    ([{**GOOD, "direction": "sideways"}], "row 1, field direction: use up, down, both, none"),
    ([{**GOOD, "window": "nonsense"}], "row 1, field window:"),
    ([{**GOOD, "min_score": "high"}], "row 1, field min_score: needs a number"),
    ([GOOD, GOOD], "row 2, field name: 'a' is already row 1's name"),
    ([GOOD, {**GOOD, "name": "b", "volume": "w.nii.gz", "output": "a.nii.gz"}, {**GOOD, "output": "a.nii.gz"}],
     "row 3, field output: "),
    ([{**GOOD, "output": "a.txt"}], "row 1, field output: Cannot write"),
])
def test_a_malformed_manifest_exits_2_naming_the_row_and_field(tmp_path, capsys, rows, expected):
    manifest = _write_manifest(tmp_path / "bad.csv", rows)
    assert main(["batch", str(manifest), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"segmentwithsam: error: {manifest}: ") and expected in err, err
    assert err.count("\n") == 1


def test_json_lines_manifest_and_bad_arguments(tmp_path, capsys):
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text(json.dumps({**GOOD, "box": [1, 2, 3, 4, 5, 3]}) + "\n[1, 2]\n")
    assert main(["batch", str(manifest), "--out", str(tmp_path / "out")]) == 2
    assert "rows.jsonl: row 2: not a JSON object" in capsys.readouterr().err
    manifest.write_text(json.dumps({**GOOD, "box": [1, 2, 3]}) + "\n")
    assert main(["batch", str(manifest), "--out", str(tmp_path / "out")]) == 2
    assert "row 1, field box" in capsys.readouterr().err
    good = _write_manifest(tmp_path / "good.csv", [GOOD])
    assert main(["batch", str(good), "--out", str(tmp_path / "out"), "--workers", "0"]) == 2
    assert "--workers and --threads need a whole number" in capsys.readouterr().err


def test_the_example_manifest_is_valid(tmp_path):
    from SegmentWithSAMLib.batch.manifest import group_jobs, parse_rows

    example = Path(__file__).resolve().parents[1] / "examples" / "cohort.csv"
    rows = parse_rows(read_manifest(example), example.parent, tmp_path, source=str(example))
    assert [r.name for r in rows][:2] == ["Hippocampus_L", "Hippocampus_R"] and len(group_jobs(rows)) == 6
    assert rows[-1].points and rows[-1].box is None and rows[0].slice_range == (55, 75)


def test_local_workers_one_per_core_or_per_gpu_each_on_its_own_cores():
    from SegmentWithSAMLib.batch.run import worker_plan

    assert worker_plan(None, None, [0, 1], gpus=0) == [[0], [1]]  # one single-threaded worker per core
    assert worker_plan(1, None, [0, 1], gpus=0) == [[0, 1]]
    assert worker_plan(None, None, list(range(16)), gpus=2) == [list(range(8)), list(range(8, 16))]  # per GPU
    assert worker_plan(3, 1, [4, 5], gpus=0) == [[4], [5], [4]]  # more workers than cores share them


def test_group_gives_one_multi_label_output_per_volume(tmp_path):
    from SegmentWithSAMLib.batch.manifest import group_jobs, parse_rows

    rows = [GOOD, {**GOOD, "name": "b", "value": "5"}, {**GOOD, "name": "c"}, {**GOOD, "volume": "w.nrrd"}]
    jobs = group_jobs(parse_rows(rows, tmp_path, tmp_path / "out", group=True))
    assert [(Path(j.output).name, j.values) for j in jobs] == [("v.nii.gz", (1, 5, 2)), ("w.nii.gz", (1,))]
    single = group_jobs(parse_rows(rows[:2], tmp_path, tmp_path / "out"))
    assert [Path(j.output).name for j in single] == ["v_a.nii.gz", "v_b.nii.gz"]


def test_a_multi_label_segmentation_file_names_each_segment(tmp_path):
    import slicerio

    from SegmentWithSAMLib.io import write_labels

    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1, 1:3, 1:3], labels[2, 2:4, 3:5] = 1, 2
    write_labels(labels, Volume(labels, np.diag([0.5, 0.5, 2.0, 1.0])), tmp_path / "two.seg.nrrd",
                 {1: "Hippocampus_L", 2: "Amygdala_L"})
    segmentation = slicerio.read_segmentation(str(tmp_path / "two.seg.nrrd"))
    assert [s["name"] for s in segmentation["segments"]] == ["Hippocampus_L", "Amygdala_L"]
    extracted = slicerio.extract_segments(segmentation, [("Hippocampus_L", 1), ("Amygdala_L", 2)])
    assert np.array_equal(extracted["voxels"].transpose(2, 1, 0), labels)
