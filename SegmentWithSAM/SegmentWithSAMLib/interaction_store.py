"""Interaction states on disk, keyed by the image and the prompts that made them, so that a fresh process given
the same prompts plus one more click (each step of the CVPR 2025 challenge is a new process) applies that one
click instead of replaying the box and every click before it.

An entry is one ``.npz`` file (``allow_pickle=False``; :meth:`~.state.ObjectState.to_message`), named by a
BLAKE2b hash of the model, the image's content, window, view, the engine's code (a changed engine never reads
older states) and the prompts in order; written atomically, an unreadable one is a miss; at most ``max_files``,
least recently used first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .disk_cache import default_disk_cache_dir, model_identity
from .errors import OutputError
from .folders import private_folder
from .io import atomic_write
from .state import ObjectState

MAX_FILES = 256
_ENGINE_CODE = ("engine.py", "actions.py", "state.py", "refinement.py", "propagation.py", "prompts.py",
                "predictor.py")


def _engine_digest() -> str:
    """A digest of the code that turns prompts into states."""
    digest = hashlib.blake2b(digest_size=16)
    for name in _ENGINE_CODE:
        digest.update((Path(__file__).with_name(name)).read_bytes())
    return digest.hexdigest()


class InteractionStore:
    """Object states after a sequence of prompts, in ``folder`` (default: ``interactions`` in the embedding cache's
    folder). ``prompts`` are any JSON-able sequence describing the calls in order."""

    def __init__(self, model, volume_identity: str, window: str, view: str, folder: str | os.PathLike | None = None,
                 max_files: int = MAX_FILES) -> None:
        self.folder = Path(folder) if folder is not None else default_disk_cache_dir() / "interactions"
        self.namespace = json.dumps([model_identity(model), volume_identity, window, view, _engine_digest()])
        self.max_files = int(max_files)

    def _path(self, prompts) -> Path:
        digest = hashlib.blake2b(f"{self.namespace}\n{json.dumps(prompts)}".encode(), digest_size=20).hexdigest()
        return self.folder / f"{digest}.npz"

    def get(self, prompts, image_shape: tuple[int, int]) -> dict[str, ObjectState] | None:
        """The states stored after ``prompts``, or None."""
        path = self._path(prompts)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                headers = json.loads(str(data["header"]))
                states = {}
                for number, (name, header) in enumerate(headers.items()):
                    prefix = f"{number}/"
                    arrays = {key[len(prefix):]: data[key] for key in data.files if key.startswith(prefix)}
                    states[name] = ObjectState.from_message(header, arrays, image_shape)
        except (OSError, ValueError, KeyError, EOFError):
            path.unlink(missing_ok=True)
            return None
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)
        return states

    def put(self, prompts, states: dict[str, ObjectState]) -> None:
        """Keep ``states`` as the result of ``prompts`` (a full or read-only disk only costs the speed-up)."""
        headers, arrays = {}, {}
        for number, (name, state) in enumerate(states.items()):
            header, state_arrays = state.to_message()
            headers[name] = header
            arrays.update({f"{number}/{key}": value for key, value in state_arrays.items()})
        try:
            private_folder(self.folder)  # patients' data: the owner's only
            atomic_write(self._path(prompts), ".npz",
                         lambda tmp: np.savez_compressed(tmp, header=np.array(json.dumps(headers)), **arrays))
        except (OSError, OutputError):
            return
        entries = sorted(self.folder.glob("*.npz"), key=lambda p: p.stat().st_mtime if p.exists() else 0)
        for path in entries[: max(0, len(entries) - self.max_files)]:
            path.unlink(missing_ok=True)
