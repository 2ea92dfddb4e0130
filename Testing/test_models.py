"""More models: the registry as data, SAM/MedSAM loaded from checkpoints the test builds (no network), the
architecture check, and the consent-only downloader against a local HTTP server (resume, the whole SHA-256, a
failure of any kind ending the Slicer module's download job)."""

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
    downloadable = [entry for entry in models.values() if entry.url is not None]
    assert {entry.name for entry in downloadable} == {"sam_vit_b", "sam_vit_l", "sam_vit_h"}
    assert all(len(entry.sha256) == 64 and len(set(entry.sha256_sources)) >= 2 for entry in downloadable)
    good = {k: v for k, v in vars(models["sam_vit_b"]).items() if k != "bundled"}
    assert check_entry(good) == models["sam_vit_b"]
    digest = good["sha256"]
    for change, message in [({"url": "http://example.org/x.pth"}, "https"),
                            ({"sha256": None, "sha256_sources": ()}, "come with a sha256"),
                            ({"sha256": "01ec64"}, "64 lowercase hex"), ({"sha256": digest[:6]}, "64 lowercase hex"),
                            ({"sha256": digest[:63]}, "64 lowercase hex"), ({"sha256": digest.upper()}, "64 lowercase"),
                            ({"sha256_sources": good["sha256_sources"][:1]}, "two independent public sources"),
                            ({"sha256_sources": good["sha256_sources"][:1] * 2}, "two independent public sources"),
                            ({"sha256": None, "url": None}, "two independent public sources"),
                            ({"sha256_sources": ["http://example.org/a", "http://example.org/b"]}, "https addresses"),
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

        # the whole digest counts: one differing in its last hex digit only (its first 63 the file's) is refused
        digest = entry.sha256
        for near in (digest[:-1] + ("1" if digest[-1] == "0" else "0"), digest[:6] + "0" * 58):
            with pytest.raises(CheckpointError, match=f"SHA-256 {digest}, not the expected {near}: it was deleted"):
                download(replace(entry, sha256=near), server.url, tmp_path / "other.pth", progress=False)
            assert not (tmp_path / "other.pth").exists() and not (tmp_path / "other.pth.part").exists()
    finally:
        server.close()


def test_a_download_that_fails_in_an_unexpected_way_ends_its_job(controller, tmp_path, monkeypatch):
    """The Slicer module's controller (real MRML scene): a download thread ended by an error that is not one of
    ours (here the ValueError urllib raises for an address it cannot parse) reports it, and the next one runs."""
    from SegmentWithSAMLib.models.catalog import MODELS_ENV

    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    payload = b"weights" * 1000
    entry = replace(registry()["sam_vit_b"], sha256=hashlib.sha256(payload).hexdigest(), size=len(payload))
    controller.start_download(entry, "no-scheme/sam_vit_b.pth")
    controller.wait(30)
    assert controller.download is None and controller.progress is None and controller.status_error
    assert controller.status.startswith("Download of sam_vit_b failed: unexpected ValueError (unknown url type")
    server = FileServer(payload)
    try:
        controller.start_download(entry, server.url)
        controller.wait(30)
    finally:
        server.close()
    assert controller.status == "sam_vit_b is installed." and entry.path.read_bytes() == payload
