"""Propagation with SAM 2's video predictor (SAM 2.1, MedSAM2): the object is tracked through the slices with
SAM 2's memory of earlier slices instead of being re-prompted slice by slice.

The slices go to SAM 2 from the volume in memory (:class:`SliceFrames`, prepared when asked for). Each direction
is its own "video" starting at the seed slice, so the memory holds only that direction. :class:`Tracker` is the
mask source :class:`~.propagation.Propagator` uses for such models (range, stop rules etc. stay the
Propagator's).
"""

from __future__ import annotations

import contextlib

import numpy as np

from .predictor import normalize_slice
from .preprocessing import SliceTransform


class SliceFrames:
    """Slices ``first``, ``first + step``, … ``last`` of one view as SAM 2 video frames: frame i is a float32
    tensor (3, S, S), windowed, normalised for the model and placed like a single-slice input."""

    def __init__(self, session, axes, first: int, last: int, step: int) -> None:
        self.session, self.axes = session, axes
        self.indices = range(first, last + step, step)
        self.transform = SliceTransform.for_slice(axes.image_shape, axes.pixel_spacing, session.model.input_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, frame: int):
        self.session.model.encoder_runs += 1  # SAM 2 reads a frame only to encode it
        import torch

        image = self.session.windowed_slice(self.axes, self.indices[frame])
        return self.session.model.normalize(torch.from_numpy(self.transform.image_to_model(normalize_slice(image))))[0]


@contextlib.contextmanager
def _fed_from(frames: SliceFrames):
    """Within this block SAM 2's video predictor reads its frames from ``frames`` instead of a folder of image
    files, and shows no progress bar of its own (the caller reports progress). Swaps two names in the
    ``sam2.sam2_video_predictor`` module and restores them; the model runs on one thread."""
    from sam2 import sam2_video_predictor as module

    size = frames.session.model.input_size
    saved = module.load_video_frames, module.tqdm
    module.load_video_frames = lambda **_: (frames, size, size)
    module.tqdm = lambda iterable, **_: iterable
    try:
        yield
    finally:
        module.load_video_frames, module.tqdm = saved


class Tracker:
    """Masks for :class:`~.propagation.Propagator` from SAM 2's tracking, one direction at a time.

    ``seed`` (slice, mask) and ``keys`` (slice → mask) are the Propagator's; the seed and every key slice in the
    direction are conditioning frames of SAM 2's memory.
    """

    def __init__(self, propagator, seed: tuple[int, np.ndarray], keys: dict, low: int, high: int) -> None:
        self.session, self.axes = propagator.session, propagator.axes
        self.model = self.session.model
        self.seed, self.keys, self.low, self.high = seed, keys, low, high
        self._frames = self._stream = self._state = None
        self._current: tuple[int, object] | None = None  # (slice, SAM 2's logits there)

    def start(self, step: int, start: int) -> None:
        """Begin tracking from slice ``start`` in direction ``step`` (+1 up, -1 down) to the range end."""
        import torch

        self.close()
        frames = SliceFrames(self.session, self.axes, start, self.high if step > 0 else self.low, step)
        predictor = self.model.net
        with _fed_from(frames), torch.inference_mode(), self.model.encoder_precision():
            state = predictor.init_state(video_path=None)
            for index, mask in {self.seed[0]: self.seed[1], **self.keys}.items():
                if index in frames.indices:
                    model_mask = frames.transform.image_to_model(np.asarray(mask, dtype=np.float32))[0, 0]
                    predictor.add_new_mask(state, frames.indices.index(index), 0, model_mask >= 0.5)
            self._stream = predictor.propagate_in_video(state, start_frame_idx=0)
            self._frames, self._state = frames, state
            self._advance()  # the start slice itself (created here, so SAM 2's progress bar stays off)

    def _advance(self) -> None:
        with self.model.encoder_precision():
            frame, _, logits = next(self._stream)
        self._current = (self._frames.indices[frame], logits)

    def predict(self, index: int, previous: np.ndarray, gap: int) -> tuple[np.ndarray, float]:
        """The mask (rows, cols) on slice ``index`` (the next slices in this direction are tracked up to it) and
        SAM 2's predicted probability that the object is there; SAM 2 remembers the earlier slices itself, so
        ``previous`` (``gap`` slices away) is not needed."""
        import torch

        while self._current[0] != index:
            self._advance()
        logits = self._current[1]
        mask = self._frames.transform.logits_to_slice(logits[0:1].float().cpu().numpy())[0, 0] > 0
        output = self._state["output_dict_per_obj"][0]
        frame = self._frames.indices.index(index)
        out = output["non_cond_frame_outputs"].get(frame) or output["cond_frame_outputs"].get(frame)
        presence = float(torch.sigmoid(out["object_score_logits"].float()).max()) if out else 1.0
        return mask, presence

    def similarity(self, mask: np.ndarray) -> None:
        """No appearance check: SAM 2's memory and its object-presence score take that role."""
        return None

    def close(self) -> None:
        """Stop tracking (SAM 2 stops computing further slices) and let go of its state."""
        if self._stream is not None:
            self._stream.close()
        self._stream = self._current = self._frames = self._state = None
