"""A model's checkpoint downloading on a background thread, after the user agreed (the GUI thread only polls)."""

from __future__ import annotations

import threading

from SegmentWithSAMLib.errors import SegmentWithSAMError


class ModelDownload:
    """Downloads registry ``entry`` (from ``url``, default its own) at once on a thread of its own: ``done`` and
    ``total`` bytes so far, ``finished``, then ``error`` (None when it succeeded); :meth:`cancel` stops it (the
    partial file is kept to resume)."""

    def __init__(self, entry, url: str | None = None) -> None:
        self.entry, self.url = entry, url
        self.done, self.total = 0, entry.size
        # stays set unless the download returns, so a thread ended by anything at all reports a failure
        self.error: str | None = "it stopped unexpectedly; try again"
        self.finished = self.cancelled = False
        threading.Thread(target=self._run, name="model-download", daemon=True).start()

    def _run(self) -> None:
        from SegmentWithSAMLib.download import download

        try:
            download(self.entry, self.url, progress=False, on_progress=self._progress, cancel=lambda: self.cancelled)
        except SegmentWithSAMError as error:
            self.error = str(error)
        except Exception as error:  # a failure of any kind must end the job, or "Downloading…" stays forever
            self.error = f"unexpected {type(error).__name__} ({error}); try again"
        else:
            self.error = None
        finally:
            self.finished = True

    def _progress(self, done: int, total: int) -> None:
        self.done, self.total = done, total

    def cancel(self) -> None:
        self.cancelled = True
