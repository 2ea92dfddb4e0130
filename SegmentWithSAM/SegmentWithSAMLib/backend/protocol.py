"""The backend's wire format: a small JSON header plus raw array bytes. Never pickle, never eval.

A frame is::

    MAGIC (4 bytes) | header length (uint32 LE) | payload length (uint64 LE) | header (UTF-8 JSON) | payload

The header is a JSON object with at least ``op`` (str); ``arrays`` lists the arrays in the payload, in order,
as ``{"name", "dtype", "shape"}`` with a dtype from :data:`DTYPES`; the payload is exactly their C-order bytes.
Everything is checked before any array is built, so a hostile or corrupt frame costs at most its length.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import ProtocolError
from ..release import RELEASE

PROTOCOL_VERSION = 3  # 2: one 'step' operation on object states kept under a version; 3: the key, sessions
KEY_ENV = "SEGMENTWITHSAM_KEY"  # the access key of a server, for the server and its clients
MIN_KEY_LENGTH = 16
LISTENING = re.compile(r"Listening on (tcp|tls)://(\S+):(\d+)")  # the first line a network server prints
MAGIC = b"SWS\x01"
PREFIX = struct.Struct("<4sIQ")
MAX_HEADER_BYTES = 1 << 20
DEFAULT_MAX_PAYLOAD = 2 << 30  # a 512×512×2000 int16 volume fits
MAX_DIMS = 4
SMALL_FRAME = 1 << 16
# Little-endian, fixed-size numeric types only: nothing that could carry objects.
DTYPES = frozenset({"|b1", "|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f4", "<f8"})


class KeyRefused(ProtocolError):
    """A peer's hello had no key, or the wrong one."""


class VersionMismatch(ProtocolError):
    """Client and server speak different protocol versions."""


def check_hello(header: dict, key: str | None) -> None:
    """The handshake's rules, for every server: the first message is a hello, then the key is checked (when
    the server has one), then the protocol version. Raises :class:`KeyRefused`, :class:`VersionMismatch` or
    :class:`ProtocolError` (not a hello)."""
    if header.get("op") != "hello":
        raise ProtocolError("Say hello first: the key and the protocol version are checked before anything else.")
    if key is not None and not hmac.compare_digest(str(header.get("key", "")).encode(), key.encode()):
        raise KeyRefused("Wrong or missing key: connection refused.")
    version = header.get("version")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(f"The client speaks protocol version {version!r} (SegmentWithSAM "
                              f"{header.get('release', '?')}); this server speaks {PROTOCOL_VERSION} (SegmentWithSAM "
                              f"{RELEASE}). Install one release on both.")


class OversizedFrame(ProtocolError):
    """A well-formed frame whose payload exceeds the limit; ``skip`` bytes follow its prefix."""

    def __init__(self, message: str, skip: int) -> None:
        super().__init__(message)
        self.skip = skip


@dataclass
class Message:
    """One decoded frame: ``header`` (JSON object) and ``arrays`` (name → read-only NumPy array)."""

    header: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def op(self) -> str:
        return self.header["op"]


def _wire_array(name: str, array) -> tuple[dict, np.ndarray]:
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    if dtype.str not in DTYPES:
        raise ProtocolError(f"Array {name!r} has type {array.dtype}; the protocol carries {sorted(DTYPES)}.")
    if array.ndim > MAX_DIMS:
        raise ProtocolError(f"Array {name!r} has {array.ndim} dimensions; at most {MAX_DIMS} are carried.")
    array = np.ascontiguousarray(array, dtype=dtype)
    return {"name": name, "dtype": dtype.str, "shape": list(array.shape)}, array


def encode(header: dict, arrays: dict[str, np.ndarray] | None = None) -> list[bytes | memoryview]:
    """The frame for ``header`` and ``arrays`` as a list of buffers (array bytes are not copied, except in a
    small frame, joined into one buffer)."""
    specs, buffers = [], []
    for name, array in (arrays or {}).items():
        spec, wire = _wire_array(name, array)
        specs.append(spec)
        buffers.append(wire.reshape(-1).view(np.uint8).data)
    body = json.dumps({**header, "arrays": specs}, separators=(",", ":"), allow_nan=False).encode()
    if len(body) > MAX_HEADER_BYTES:
        raise ProtocolError(f"The message header is {len(body)} bytes; at most {MAX_HEADER_BYTES} are allowed.")
    payload = sum(len(b) for b in buffers)
    frame = [PREFIX.pack(MAGIC, len(body), payload), body, *buffers]
    return [b"".join(frame)] if payload + len(body) <= SMALL_FRAME else frame  # small: one write, one packet


def write_all(fd: int) -> Callable[[bytes | memoryview], None]:
    """A function writing a whole buffer to the pipe ``fd`` (``os.write`` may write only part of it)."""
    def write(buffer) -> None:
        view = memoryview(buffer)
        while view:
            view = view[os.write(fd, view):]
    return write


def parse_prefix(prefix: bytes, max_payload: int = DEFAULT_MAX_PAYLOAD) -> tuple[int, int]:
    """Header and payload lengths from the 16-byte frame prefix; :class:`ProtocolError` if they are invalid.
    An oversized payload raises :class:`OversizedFrame`, so a stream reader can discard it."""
    magic, header_len, payload_len = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise ProtocolError("Not a SegmentWithSAM frame (bad magic bytes).")
    if header_len > MAX_HEADER_BYTES:
        raise ProtocolError(f"The header is {header_len} bytes; at most {MAX_HEADER_BYTES} are allowed.")
    if payload_len > max_payload:
        raise OversizedFrame(f"The payload is {payload_len} bytes; at most {max_payload} are allowed.",
                             header_len + payload_len)
    return header_len, payload_len


def _check_spec(spec) -> tuple[str, np.dtype, tuple[int, ...], int]:
    if not isinstance(spec, dict) or set(spec) != {"name", "dtype", "shape"}:
        raise ProtocolError("Each array spec must be an object with exactly name, dtype and shape.")
    name, dtype, shape = spec["name"], spec["dtype"], spec["shape"]
    if not isinstance(name, str) or not name:
        raise ProtocolError("An array name must be a non-empty string.")
    if dtype not in DTYPES:
        raise ProtocolError(f"Array {name!r}: dtype {dtype!r} is not carried by the protocol.")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(type(n) is int and 0 <= n < 1 << 40 for n in shape)):
        raise ProtocolError(f"Array {name!r}: the shape must be a list of at most {MAX_DIMS} non-negative ints.")
    dtype = np.dtype(dtype)
    return name, dtype, tuple(shape), int(np.prod(shape, dtype=object)) * dtype.itemsize


def parse_body(header_bytes: bytes, payload: bytes | bytearray | memoryview) -> Message:
    """The message in a frame's header and payload bytes; :class:`ProtocolError` if anything is off."""
    try:
        header = json.loads(bytes(header_bytes).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ProtocolError(f"The message header is not valid UTF-8 JSON ({type(error).__name__}).") from None
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise ProtocolError("The message header must be a JSON object with a string 'op'.")
    specs = header.pop("arrays", [])
    if not isinstance(specs, list):
        raise ProtocolError("'arrays' must be a list of array specs.")
    arrays, offset = {}, 0
    for spec in specs:
        name, dtype, shape, nbytes = _check_spec(spec)
        if name in arrays:
            raise ProtocolError(f"Array {name!r} appears twice.")
        if offset + nbytes > len(payload):
            raise ProtocolError(f"Array {name!r} needs {nbytes} bytes; the payload is too short.")
        array = np.frombuffer(payload, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset).reshape(shape)
        if dtype == np.bool_ and array.size and np.frombuffer(payload, np.uint8, nbytes, offset).max() > 1:
            raise ProtocolError(f"Array {name!r}: a boolean array holds bytes other than 0 and 1.")
        arrays[name] = array
        offset += nbytes
    if offset != len(payload):
        raise ProtocolError(f"The payload has {len(payload) - offset} bytes beyond its arrays.")
    return Message(header, arrays)


class StreamReader:
    """Reads messages from a byte stream (``read(n)`` returning up to n bytes, b"" at end).

    A malformed message raises :class:`ProtocolError` after the reader has moved past it, so the caller can
    reply with an error and go on reading: an oversized payload is discarded in chunks, bad magic bytes are
    skipped up to the next frame.
    """

    def __init__(self, read: Callable[[int], bytes], max_payload: int = DEFAULT_MAX_PAYLOAD,
                 resync: bool = True) -> None:
        self._read = read
        self.max_payload = max_payload
        self.resync = resync  # False: bad magic bytes raise at once, nothing more is read (a peer not yet trusted)
        self._pending = b""

    def _exact(self, n: int) -> bytes | None:
        chunks, have = [self._pending[:n]], len(self._pending[:n])
        self._pending = self._pending[n:]
        while have < n:
            chunk = self._read(min(n - have, 1 << 24))
            if not chunk:
                if have:
                    raise EOFError(f"The stream ended inside a frame ({have} of {n} bytes).")
                return None
            chunks.append(chunk)
            have += len(chunk)
        return b"".join(chunks) if len(chunks) > 1 else chunks[0]

    def _into(self, n: int) -> bytearray:
        buffer = bytearray(n)
        view, have = memoryview(buffer), 0
        while have < n:
            chunk = self._exact(min(n - have, 1 << 24))
            if chunk is None:
                raise EOFError("The stream ended inside a frame payload.")
            view[have: have + len(chunk)] = chunk
            have += len(chunk)
        return buffer

    def _skip_to_magic(self, data: bytes) -> int:
        """Discard bytes (``data`` first, then the stream) up to the next MAGIC; returns how many went."""
        skipped = 0
        while True:
            at = data.find(MAGIC, 1 if not skipped else 0)
            if at >= 0:
                self._pending = data[at:] + self._pending
                return skipped + at
            keep = len(MAGIC) - 1
            skipped += len(data) - keep
            more, self._pending = self._pending or self._read(1 << 16), b""
            data = data[-keep:] + more
            if len(data) <= keep:  # end of stream
                return skipped + len(data)

    def read(self) -> Message | None:
        """The next message, or None at a clean end of stream; EOFError if the stream ends mid-frame."""
        prefix = self._exact(PREFIX.size)
        if prefix is None:
            return None
        try:
            header_len, payload_len = parse_prefix(prefix, self.max_payload)
        except OversizedFrame as error:
            skip = error.skip
            while skip:
                chunk = self._exact(min(skip, 1 << 24))
                if chunk is None:
                    raise EOFError("The stream ended inside an oversized frame.") from None
                skip -= len(chunk)
            raise
        except ProtocolError:
            if not self.resync:
                raise
            skipped = self._skip_to_magic(prefix)
            raise ProtocolError(f"Not a SegmentWithSAM frame: skipped {skipped} bytes to the next one.") from None
        header = self._exact(header_len) if header_len else b""
        if header is None:
            raise EOFError("The stream ended inside a frame header.")
        payload = self._into(payload_len)
        return parse_body(header, payload)
