"""One exception type per kind of user error; each message says what is wrong and what to do."""


class SegmentWithSAMError(Exception):
    """Base class of every error a user can act on (the CLI maps these to exit status 2)."""


class VolumeError(SegmentWithSAMError):
    """The image volume cannot be read or cannot be segmented (4D, RGB, empty, constant, NaN...)."""


class PromptError(SegmentWithSAMError):
    """A prompt is outside the volume, not on one slice, or otherwise unusable."""


class CheckpointError(SegmentWithSAMError):
    """A model checkpoint is missing, truncated, not a checkpoint, or for another architecture."""


class ModelError(SegmentWithSAMError):
    """An unknown model name or a model that cannot run on the chosen device."""


class OutputError(SegmentWithSAMError):
    """An output file cannot be written."""


class ManifestError(SegmentWithSAMError):
    """A batch manifest (or its command line) is malformed: the message names the row and the field."""


class BackendError(SegmentWithSAMError):
    """The background inference process failed, crashed, hung or could not be started."""


class ProtocolError(BackendError):
    """A message on the backend channel is malformed, oversized, or from another protocol version."""
