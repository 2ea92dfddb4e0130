"""A whole cohort from prompts: one row per object (:mod:`.manifest`), run as Dask tasks (:mod:`.run`, one per
volume, :mod:`.tasks` on the workers), resumable by per-row records (:mod:`.records`). Dask is imported only
when a run starts."""

from .manifest import Options, Row, read_manifest
from .run import BatchReport, run_batch

__all__ = ["BatchReport", "Options", "Row", "read_manifest", "run_batch"]
