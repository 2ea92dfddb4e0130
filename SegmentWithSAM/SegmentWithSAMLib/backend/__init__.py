"""The background inference process and its non-blocking client (see :mod:`.client`)."""
