"""More models: the registry as data, SAM/MedSAM loaded from checkpoints the test builds (no network), the
architecture check, and the consent-only downloader against a local HTTP server (resume, SHA-256)."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import pytest
import torch

from SegmentWithSAMLib.api import Segmenter
from SegmentWithSAMLib.cli import main as cli
from SegmentWithSAMLib.download import download
from SegmentWithSAMLib.errors import CheckpointError, ModelError
from SegmentWithSAMLib.loading import load_model
from SegmentWithSAMLib.models import registry
from SegmentWithSAMLib.models.catalog import check_entry
from SegmentWithSAMLib.session import Session

from conftest import FileServer, structure_box_ras


def test_registry_entries_pass_their_schema_and_bad_ones_are_named():
    models = registry()
    assert {"litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam"} <= set(models)
    assert all(entry.url is None or entry.sha256 for entry in models.values())
    good = {k: v for k, v in vars(models["sam_vit_b"]).items() if k != "bundled"}
    for change, message in [({"url": "http://example.org/x.pth"}, "https"), ({"sha256": None}, "sha256"),
                            ({"architecture": "unet"}, "unknown architecture"), ({"size": "big"}, "'size'"),
                            ({"extra": 1}, "unknown fields")]:
        with pytest.raises(ModelError, match=message):
            check_entry({**good, **change})


def test_models_command_lists_what_is_installed(capsys):
    assert cli(["models", "--json"]) == 0
    import json

    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)["models"]}
    assert listed["litemedsam"]["installed"] and not listed["medsam"]["installed"]


@pytest.fixture(scope="module")
def vit_b_checkpoint(tmp_path_factory):
    """A randomly initialised SAM ViT-B saved as a plain state dict (real weights are not available offline)."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_random.pth"
    torch.save(sam_model_registry["vit_b"]().state_dict(), path)
    return path


def test_sam_and_medsam_load_through_the_real_loader_and_predict(vit_b_checkpoint, colin, atlas):
    sam = load_model(vit_b_checkpoint, "cpu", engine="torch")  # the architecture is read from the weights
    assert sam.name == "sam_vit_b" and sam.input_size == 1024 and sam.normalization == "imagenet"
    medsam = load_model("medsam", "cpu", engine="torch", checkpoint=vit_b_checkpoint)
    assert medsam.name == "medsam" and medsam.normalization == "minmax"
    session = Session(colin, sam)
    axes = session.axes("coronal")
    index, box = structure_box_ras(colin, atlas, axes, "Putamen_L")
    seg = Segmenter(colin, sam, "coronal", session=session)
    update = seg.prompt("putamen", box_ras=box)  # a box prompt through the engine, as every front end sends it
    assert list(update.changed) == [index] and update.changed[index].shape == axes.image_shape
    assert seg.mask("putamen").shape == colin.array.shape
    assert session.predictor._embedding.shape == (1, 256, 64, 64)
    image = torch.rand(1, 3, 1024, 1024)
    assert not torch.allclose(sam.normalize(image), medsam.normalize(image))
    # segment-anything's own decoder (not LiteMedSAM's copy) computed re-associated, as OpenVINO runs it
    from SegmentWithSAMLib.models.factored_decoder import FactoredMaskDecoder, image_tokens

    embedding = session.predictor._embedding
    sparse, dense = sam.prompt_embeddings(boxes=np.array([[300.0, 400.0, 520.0, 610.0]]))
    with torch.inference_mode():
        expected, _ = sam.mask_decoder.predict_masks(embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense)
        logits, _ = FactoredMaskDecoder(sam.prompt_encoder, sam.mask_decoder)(image_tokens(embedding), sparse,
                                                                             dense[:1, :, :1, :1])
    torch.testing.assert_close(logits, expected, atol=2e-4 * float(expected.abs().max()), rtol=0)


def test_a_checkpoint_of_another_variant_is_refused_by_name(vit_b_checkpoint):
    with pytest.raises(CheckpointError, match="looks like a VIT-B checkpoint; you chose vit_l"):
        load_model("sam_vit_l", "cpu", engine="torch", checkpoint=vit_b_checkpoint)
    with pytest.raises(CheckpointError, match="sam_vit_h is not installed: run `segmentwithsam models --download"):
        load_model("sam_vit_h", "cpu", engine="torch")


def test_the_registry_input_size_is_checked_against_the_network(monkeypatch):
    monkeypatch.setitem(registry(), "litemedsam", replace(registry()["litemedsam"], input_size=1024))
    with pytest.raises(ModelError, match="litemedsam takes 256² images, but the registry says 1024²"):
        load_model("litemedsam", "cpu", engine="torch")


def test_download_resumes_after_an_interruption_and_checks_sha256(tmp_path):
    payload = np.random.default_rng(0).bytes(3 << 20)
    server = FileServer(payload, cut_after=1 << 20)
    entry = replace(registry()["sam_vit_b"], sha256=hashlib.sha256(payload).hexdigest(), size=len(payload))
    target = tmp_path / "models" / "model.pth"
    try:
        with pytest.raises(CheckpointError, match="run the download again to resume"):
            download(entry, server.url, target, progress=False)
        assert not target.exists() and (tmp_path / "models" / "model.pth.part").stat().st_size == 1 << 20
        assert download(entry, server.url, target, progress=False) == target
        assert server.ranges == [0, 1 << 20] and target.read_bytes() == payload
        assert not (tmp_path / "models" / "model.pth.part").exists()

        bad = replace(entry, sha256="0" * 64)
        with pytest.raises(CheckpointError, match="SHA-256 .* it was deleted"):
            download(bad, server.url, tmp_path / "other.pth", progress=False)
        assert not (tmp_path / "other.pth").exists() and not (tmp_path / "other.pth.part").exists()
    finally:
        server.close()
