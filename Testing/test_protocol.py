"""The backend's wire format: round trips, every kind of malformed frame, and a fuzz run of 10 000+ messages."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from SegmentWithSAMLib.backend.protocol import MAGIC, PREFIX, Message, StreamReader, encode, parse_prefix
from SegmentWithSAMLib.errors import ProtocolError


def encode_bytes(header: dict, arrays: dict | None = None) -> bytes:
    return b"".join(bytes(b) for b in encode(header, arrays))


def decode(frame: bytes, max_payload: int = 1 << 20) -> Message | None:
    """The first message of ``frame``, read as the backend reads its channel."""
    return StreamReader(io.BytesIO(frame).read, max_payload).read()


ARRAYS = {"mask": np.eye(3, dtype=bool), "volume": np.arange(24, dtype=np.int16).reshape(2, 3, 4),
          "logits": np.linspace(-1, 1, 5, dtype=np.float32), "empty": np.zeros((0, 3), np.float64)}
FRAME = encode_bytes({"op": "predict", "id": 7, "view": "axial"}, ARRAYS)


def test_round_trip_keeps_header_arrays_and_types():
    message = decode(FRAME)
    assert message.header == {"op": "predict", "id": 7, "view": "axial"}
    for name, array in ARRAYS.items():
        assert message.arrays[name].dtype == array.dtype and np.array_equal(message.arrays[name], array)


def test_big_endian_and_non_contiguous_arrays_are_sent_as_little_endian_c_order():
    array = np.arange(12, dtype=">i4").reshape(3, 4)[:, ::2]
    out = decode(encode_bytes({"op": "x"}, {"a": array})).arrays["a"]
    assert out.dtype == np.dtype("<i4") and np.array_equal(out, array)


@pytest.mark.parametrize(("arrays", "message"), [
    ({"a": np.array(["text"])}, "carries"),
    ({"a": np.array([object()])}, "carries"),
    ({"a": np.zeros((1,) * 5, np.uint8)}, "dimensions"),
])
def test_encode_refuses_what_the_protocol_does_not_carry(arrays, message):
    with pytest.raises(ProtocolError, match=message):
        encode_bytes({"op": "x"}, arrays)


def _frame(header: bytes, payload: bytes = b"", magic: bytes = MAGIC) -> bytes:
    return PREFIX.pack(magic, len(header), len(payload)) + header + payload


@pytest.mark.parametrize(("frame", "message"), [
    (_frame(b'{"op":"x"}', magic=b"HTTP"), "Not a SegmentWithSAM frame"),
    (_frame(b"\xff\xfe"), "UTF-8 JSON"),
    (_frame(b"[1, 2]"), "JSON object"),
    (_frame(b'{"op": 3}'), "string 'op'"),
    (_frame(b'{"op":"x","arrays":{}}'), "list"),
    (_frame(b'{"op":"x","arrays":[{"name":"a","dtype":"|O","shape":[1]}]}', b"\0" * 8), "not carried"),
    (_frame(b'{"op":"x","arrays":[{"name":"a","dtype":"<f4","shape":[-1]}]}'), "non-negative"),
    (_frame(b'{"op":"x","arrays":[{"name":"a","dtype":"<f4","shape":[4]}]}', b"\0" * 8), "too short"),
    (_frame(b'{"op":"x","arrays":[{"name":"a","dtype":"|u1","shape":[1]}]}', b"\0\0"), "beyond"),
    (_frame(b'{"op":"x","arrays":[{"name":"a","dtype":"|b1","shape":[2]}]}', b"\0\x02"), "boolean"),
    (_frame(b'{"op":"x","arrays":[{"name":"a","dtype":"|u1","shape":[1]},'
            b'{"name":"a","dtype":"|u1","shape":[1]}]}', b"\0\0"), "twice"),
    (_frame(b'{"op":"x","arrays":[{"name":"a","dtype":"|u1","shape":[1],"code":"x"}]}', b"\0"), "exactly"),
])
def test_malformed_frames_are_refused_with_a_reason(frame, message):
    with pytest.raises(ProtocolError, match=message):
        decode(frame)


@pytest.mark.parametrize("frame", [FRAME[:-1], FRAME[:10]])
def test_a_stream_ending_inside_a_frame_is_an_end_of_file(frame):
    with pytest.raises(EOFError, match="ended inside"):
        decode(frame)


def test_oversized_frames_are_refused_before_reading_them():
    with pytest.raises(ProtocolError, match="at most 50 "):
        decode(FRAME, max_payload=50)
    with pytest.raises(ProtocolError, match="header"):
        parse_prefix(PREFIX.pack(MAGIC, 1 << 30, 0))
    with pytest.raises(ProtocolError, match="magic"):
        parse_prefix(PREFIX.pack(b"HTTP", 10, 0))


def test_stream_reader_skips_bad_frames_and_keeps_reading():
    good = encode_bytes({"op": "status", "id": 1})
    oversized = encode_bytes({"op": "big", "id": 2}, {"a": np.zeros(1000, np.uint8)})
    stream = io.BytesIO(b"garbage before" + good + oversized + _frame(b"{bad json") + good)
    reader = StreamReader(stream.read, max_payload=500)
    outcomes = []
    for _ in range(6):
        try:
            message = reader.read()
            outcomes.append(message.op if message else None)
        except ProtocolError as error:
            outcomes.append(str(error).split(":")[0])
    assert outcomes == ["Not a SegmentWithSAM frame", "status", "The payload is 1000 bytes; at most 500 are allowed.",
                        "The message header is not valid UTF-8 JSON (JSONDecodeError).", "status", None]


def _read_all(data: bytes, limit: int = 10_000) -> list:
    """Read a stream to its end, collecting messages and errors; fails the test if it does not end."""
    reader, seen = StreamReader(io.BytesIO(data).read, max_payload=1 << 16), []
    for _ in range(limit):
        try:
            message = reader.read()
        except ProtocolError as error:
            seen.append(error)
            continue
        except EOFError:
            return seen
        if message is None:
            return seen
        assert isinstance(message, Message)
        seen.append(message)
    raise AssertionError("the stream reader did not reach the end of a finite stream")


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    buffer = bytearray(data)
    for kind, at, value in edits:
        if not buffer:
            break
        at %= len(buffer)
        if kind == 0:
            buffer[at] ^= 1 << (value % 8)
        elif kind == 1:
            del buffer[at: at + 1 + value % 16]
        elif kind == 2:
            buffer[at:at] = bytes([value % 256]) * (1 + value % 5)
        else:
            buffer[at] = value % 256
    return bytes(buffer)


FUZZ = settings(max_examples=5_000, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1,
                max_size=6))
def test_fuzz_mutated_frames_never_crash_or_hang(edits):
    """5 000 mutations of a valid frame (bit flips, cuts, insertions, overwrites), each decoded alone and as a
    stream between two valid frames."""
    mutated = _mutate(FRAME, edits)
    _read_all(mutated)
    _read_all(FRAME + mutated + FRAME)


@FUZZ
@given(st.binary(max_size=256), st.binary(max_size=64))
def test_fuzz_random_bytes_never_crash_or_hang(noise, json_noise):
    """5 000 random byte strings, alone and behind a valid prefix, and random headers in a valid frame."""
    for data in (noise, MAGIC + noise, _frame(json_noise), _frame(b'{"op":"x","arrays":' + json_noise + b"}")):
        _read_all(data)


def test_header_lengths_are_little_endian_fixed_width():
    assert PREFIX.size == 16 and struct.unpack("<I", FRAME[4:8])[0] == len(FRAME) - 16 - sum(
        a.nbytes for a in ARRAYS.values())


# ---- what a step carries: actions and object states (SegmentWithSAMLib.actions, .state) ----------------------
def _over_the_wire(header: dict, arrays: dict) -> Message:
    return decode(encode_bytes({"op": "step", "id": 1, "body": header}, arrays))


def test_actions_cross_the_wire_unchanged():
    from SegmentWithSAMLib.actions import Box3D, Click, Prompt, Propagate, UserEdit, from_message, to_message
    from SegmentWithSAMLib.propagation import StopRules

    for action in (Prompt(2, (1.0, 2.0, 3.5, 4.0), ((1.0, 2.0, True), (3.0, 1.0, False)), (0, 5)),
                   Prompt(1, None, ((1.5, 1.0, True),)), Box3D(3, (0.0, 0.0, 9.0, 7.0), (1, 5)),
                   Click(4, (1.0, 2.0), False), Propagate(3), Propagate(3, "up", (1, 6), StopRules(min_similarity=None),
                                                                       1)):
        message = _over_the_wire(*to_message(action))
        assert from_message(message.header["body"], message.arrays) == action
    edit = UserEdit({3: np.eye(4, dtype=bool), 5: np.zeros((4, 4), bool)})
    header, arrays = to_message(edit)
    message = _over_the_wire(header, arrays)
    back = from_message(message.header["body"], message.arrays)
    assert sorted(back.masks) == [3, 5] and all(np.array_equal(back.masks[i], edit.masks[i]) for i in edit.masks)


@pytest.mark.parametrize(("header", "message"), [
    ({"type": "nope"}, "An action needs a type"),
    ("click", "An action needs a type"),
    ({"type": "click", "index": 1}, "The click action is malformed"),
    ({"type": "prompt", "index": 1, "box": [1, 2]}, "(?i)a box is x0, y0, x1, y1"),
    ({"type": "box3d", "index": 1, "box": [0, 0, 1, 1]}, "slice_range"),
    ({"type": "propagate", "index": 1, "slice_range": [1]}, "The propagate action is malformed|two numbers"),
    ({"type": "propagate", "index": 1, "direction": "sideways"}, "The propagate action is malformed"),
    ({"type": "user_edit", "slices": [2]}, "The user_edit action is malformed"),
])
def test_malformed_actions_are_refused_with_a_reason(header, message):
    from SegmentWithSAMLib.actions import from_message
    from SegmentWithSAMLib.errors import PromptError

    with pytest.raises(PromptError, match=message):
        from_message(header, {})


def _state():
    from SegmentWithSAMLib.state import Kind, ObjectState

    rng = np.random.default_rng(0)
    masks = {i: rng.random((4, 5)) > 0.5 for i in range(2, 7)}
    kinds = {i: Kind.KEY if i == 4 else Kind.ENGINE for i in masks}
    return ObjectState((1, 8), masks, kinds, clicks={4: [(1.0, 2.0, True)]}, base={4: masks[4] & False},
                       offset=np.array([-1.0, -2.0, 1.5, 2.0]), box=(4, np.array([0.0, 1.0, 3.0, 3.5])))


def _assert_same(got, expected) -> None:
    assert got.slice_range == expected.slice_range and got.kinds == expected.kinds and got.clicks == expected.clicks
    assert sorted(got.masks) == sorted(expected.masks)
    assert all(np.array_equal(got.masks[i], m) for i, m in expected.masks.items())
    assert sorted(got.base) == sorted(expected.base)
    assert all((got.base[i] is None and b is None) or np.array_equal(got.base[i], b) for i, b in expected.base.items())
    assert np.array_equal(got.offset, expected.offset) and got.box[0] == expected.box[0]
    assert np.array_equal(got.box[1], expected.box[1]) and got.rules == expected.rules


def test_a_state_crosses_the_wire_whole_and_as_a_delta_of_the_slices_that_changed():
    from SegmentWithSAMLib.propagation import StopRules
    from SegmentWithSAMLib.state import Kind, ObjectState

    old = _state()
    message = _over_the_wire(*old.to_message())
    _assert_same(ObjectState.from_message(message.header["body"], message.arrays, (4, 5)), old)
    # A step: slice 5 gets a click (a key slice now, its old mask the base), slice 6 goes, slice 7 comes.
    new = old.copy()
    new.masks[5], new.kinds[5] = ~old.masks[5], Kind.KEY
    new.clicks[5], new.base[5] = [(3.0, 1.0, False)], old.masks[5]
    del new.masks[6], new.kinds[6]
    new.masks[7], new.kinds[7] = old.masks[2] | old.masks[3], Kind.ENGINE
    new.slice_range, new.rules = (0, 8), StopRules(min_similarity=None)
    changed = new.changed_since(old)
    assert changed == {5, 6, 7}
    header, arrays = new.to_message(changed)
    assert sorted(arrays) == ["base/5", "mask/5", "mask/7"] and header["slices"]["6"] is None
    message = _over_the_wire(header, arrays)
    applied = old.apply_message(message.header["body"], message.arrays, (4, 5))
    _assert_same(applied, new)
    assert all(applied.masks[i] is old.masks[i] for i in (2, 3, 4))  # the slices not sent are the receiver's own
    assert old.masks.keys() == {2, 3, 4, 5, 6} and 5 not in old.clicks  # and the old state is untouched
    # A slice the receiver has already (a propagation streamed it) comes as "kept", without its array.
    header["slices"]["7"]["kept"] = True
    del arrays["mask/7"]
    streamed = {7: new.masks[7].copy()}
    kept = old.apply_message(header, arrays, (4, 5), keep=streamed)
    assert kept.masks[7] is streamed[7]


@pytest.mark.parametrize("damage", ["no mask", "wrong shape", "no range", "bad kind"])
def test_malformed_states_are_refused_with_a_reason(damage):
    from SegmentWithSAMLib.errors import PromptError
    from SegmentWithSAMLib.state import ObjectState

    header, arrays = _state().to_message()
    if damage == "no mask":
        del arrays["mask/3"]
    elif damage == "wrong shape":
        arrays["mask/3"] = np.zeros((3, 3), bool)
    elif damage == "no range":
        del header["range"]
    else:
        header["slices"]["3"]["kind"] = "alien"
    with pytest.raises(PromptError, match="The object state"):
        ObjectState.from_message(header, arrays, (4, 5))
