"""Checkpoint checks before torch.load(weights_only=True), and the embedding cache's LRU bound."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from SegmentWithSAMLib.cache import EmbeddingCache
from SegmentWithSAMLib.checkpoints import load_state_dict
from SegmentWithSAMLib.errors import CheckpointError, ModelError
from SegmentWithSAMLib.loading import load_model
from SegmentWithSAMLib.models import LiteMedSAM
from SegmentWithSAMLib.models.litemedsam import bundled_checkpoint


class _Evil:
    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent-segmentwithsam-test",))


def test_bundled_checkpoint_loads(model):
    assert isinstance(model, LiteMedSAM)
    assert len(load_state_dict(bundled_checkpoint())) == 435


def test_a_copied_checkpoint_loads_by_path(tmp_path):
    path = tmp_path / "mine.pth"
    torch.save({"model": load_state_dict(bundled_checkpoint())}, path)
    assert load_model(path, "cpu", "torch").name == "litemedsam"


# The pickled object (protocol 4, as pickle.dumps writes) makes torch warn before it refuses it: expected here.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_bytes(open(bundled_checkpoint(), "rb").read()[: 1 << 20]), "truncated or corrupted"),
    (lambda p: p.write_text("not a checkpoint\n" * 200), "is not a PyTorch checkpoint"),
    (lambda p: p.write_bytes(b""), "empty or truncated"),
    (lambda p: torch.save({"weights": [1, 2, 3], "pad": torch.zeros(512)}, p), "could not be loaded safely|no model"),
    (lambda p: p.write_bytes(pickle.dumps(_Evil()) + b"\0" * 2048), "could not be loaded safely"),
    (lambda p: torch.save(torch.nn.Linear(64, 64).state_dict(), p), "does not fit the LiteMedSAM architecture"),
])
def test_bad_checkpoints_are_refused_with_a_reason(tmp_path, make, message):
    path = tmp_path / "bad.pth"
    make(path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(path, "cpu", "torch")
    assert str(path) in str(info.value)


def test_wrong_shapes_are_named(tmp_path):
    state = load_state_dict(bundled_checkpoint())
    key = "mask_decoder.iou_token.weight"
    state[key] = torch.zeros(2, 128)
    path = tmp_path / "reshaped.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=f"{key}: \\(2, 128\\) instead of \\(1, 256\\)"):
        load_model(path, "cpu", "torch")


def test_unknown_model_and_device():
    with pytest.raises(ModelError, match="Unknown model 'sam9'"):
        load_model("sam9", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA GPU"):
            load_model("litemedsam", "cuda")


def test_cache_is_lru_and_byte_bounded():
    one = torch.zeros(256)  # 1 KiB of float32
    cache = EmbeddingCache(max_bytes=3 * 1024)
    for key in "abc":
        cache.put(key, one)
    assert cache.get("a") is one  # a is now most recent
    cache.put("d", one)  # evicts b, the least recently used
    assert "b" not in cache and "a" in cache and "d" in cache
    cache.put("huge", torch.zeros(4096))  # larger than the whole cache: not kept
    assert "huge" not in cache
    assert cache.stats() == {"entries": 3, "bytes": 3 * 1024, "max_bytes": 3 * 1024, "hits": 1, "misses": 0,
                             "evictions": 1}
    assert cache.get("b") is None and cache.stats()["misses"] == 1


def test_cache_limit_from_environment(monkeypatch):
    monkeypatch.setenv("SEGMENTWITHSAM_CACHE_MB", "2")
    assert EmbeddingCache().max_bytes == 2 << 20
    monkeypatch.setenv("SEGMENTWITHSAM_CACHE_MB", "lots")
    with pytest.raises(Exception, match="not a number of megabytes"):
        EmbeddingCache()


def test_compiled_graphs_are_cached_owner_only_and_reused(tmp_path, monkeypatch):
    """The OpenVINO engine keeps its compiled graphs in the user's engine cache (owner-only); a second load
    reads them back and gives the same embeddings and masks."""
    from SegmentWithSAMLib.engines import ENGINE_CACHE_ENV

    monkeypatch.setenv(ENGINE_CACHE_ENV, str(tmp_path / "engines"))
    image = np.random.default_rng(0).random((1, 3, 256, 256), dtype=np.float32)
    first = load_model("litemedsam", "cpu", "openvino")
    compiled = tmp_path / "engines" / "compiled" / "mixed"
    blobs = sorted(p.name for p in compiled.iterdir())
    assert blobs and all(folder.stat().st_mode & 0o777 == 0o700 for folder in (compiled, compiled.parent))
    second = load_model("litemedsam", "cpu", "openvino")
    assert sorted(p.name for p in compiled.iterdir()) == blobs  # read back, none compiled anew
    embeddings = [model.encode(image) for model in (first, second)]
    assert np.array_equal(*embeddings)
    box = np.array([[50.0, 60.0, 150.0, 170.0]])
    assert np.array_equal(*(m.decode(e, boxes=box).logits
                                   for m, e in zip((first, second), embeddings, strict=True)))


def test_a_bf16_load_after_a_mixed_one_reads_no_graph_the_mixed_one_compiled(tmp_path):
    """On a CPU with AMX (OpenVINO 2026.4), the bf16 encoder stage as a mixed-precision model compiles it, read
    back by an ``openvino-bf16`` load, crashed that process; each precision keeps its own compiled graphs. Each
    load in a fresh process, as a user's next start would be."""
    from SegmentWithSAMLib.engines import ENGINE_CACHE_ENV

    script = ("import sys, numpy as np; from SegmentWithSAMLib.loading import load_model; "
              "model = load_model('litemedsam', 'cpu', sys.argv[1]); "
              "model.encode(np.zeros((1, 3, 256, 256), np.float32)); print(model.engine)")
    env = {**os.environ, ENGINE_CACHE_ENV: str(tmp_path / "engines")}
    for engine in ("openvino", "openvino-bf16", "openvino"):
        done = subprocess.run([sys.executable, "-c", script, engine], env=env, capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.split()[-1] == engine, (engine, done.returncode, done.stderr[-800:])
    assert sorted(p.name for p in (tmp_path / "engines" / "compiled").iterdir()) == ["bf16", "mixed"]


def test_loading_the_engine_sends_no_openvino_telemetry(tmp_path):
    """Importing openvino sends a usage event to Google Analytics and writes a client id in ~/intel unless the
    user opted out (a missing consent file counts as consent); the engine declines it for its process. A fresh
    process with a home of its own loads the default model and encodes a slice: nothing is written there and
    OpenVINO's telemetry has no consent."""
    from SegmentWithSAMLib.engines import ENGINE_CACHE_ENV

    script = ("import numpy as np; from SegmentWithSAMLib.loading import load_model; "
              "model = load_model('litemedsam', 'cpu', 'openvino'); "
              "model.encode(np.zeros((1, 3, 256, 256), np.float32)); "
              "import openvino_telemetry; print(openvino_telemetry.Telemetry().consent)")
    env = {**os.environ, "HOME": str(tmp_path / "home"), ENGINE_CACHE_ENV: str(tmp_path / "engines")}
    (tmp_path / "home").mkdir()
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-800:]
    assert done.stdout.split()[-1] == "False"
    assert not (tmp_path / "home" / "intel").exists()
