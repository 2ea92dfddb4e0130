"""SegmentWithSAM core: prompt-driven segmentation of medical volumes with SAM-family models.

Host-independent (no Slicer, Qt or VTK imports). Heavy dependencies (torch, SimpleITK) load lazily.
"""

from .errors import CheckpointError, ModelError, OutputError, PromptError, SegmentWithSAMError, VolumeError
from .geometry import View, Volume

__all__ = ["CheckpointError", "ModelError", "OutputError", "PromptError", "SegmentWithSAMError", "View", "Volume",
           "VolumeError"]
