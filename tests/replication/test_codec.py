"""Property tests of the `fieldsync.v1` codec: what it encodes it decodes, and whatever bytes a
peer sends, the only exception out of it is `ProtocolError` (DESIGN.md §3)."""

from __future__ import annotations

import tracemalloc
from typing import Any

import orjson
import pytest
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pycrdt import Doc, Text

from fieldsync.errors import CloseCode, ErrorCode, ProtocolError
from fieldsync.replication._codec import (
    FLAG_ZSTD,
    MAX_BATCH,
    Control,
    DocMessage,
    Kind,
    Message,
    Reader,
    SyncStep,
    YAwareness,
    YMessage,
    YOther,
    YSync,
    decode_body,
    decode_frame,
    decode_state_vector,
    decode_y,
    decompress,
    encode_awareness,
    encode_body,
    encode_frame,
    encode_sync,
    state_entries,
    varuint_value,
    write_varbytes,
    write_varstring,
    write_varuint,
)

BIG = 1 << 30  # limits that never bite, for the round trips
MAX_SAFE = (1 << 53) - 1  # lib0 integers are JavaScript safe integers

utf8_text = st.text(alphabet=st.characters(codec="utf-8"))
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-MAX_SAFE, MAX_SAFE)
    | st.floats(allow_nan=False, allow_infinity=False)
    | utf8_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(utf8_text, children, max_size=4)
    ),
    max_leaves=12,
)
controls = st.builds(
    lambda kind, extra: Control({**extra, "type": kind}),
    utf8_text,
    st.dictionaries(utf8_text, json_values, max_size=4),
)
doc_messages = st.builds(DocMessage, utf8_text, st.binary(min_size=1, max_size=300))
messages = st.one_of(controls, doc_messages)
compressors = st.sampled_from(
    [None, zstandard.ZstdCompressor(), zstandard.ZstdCompressor(level=19)]
)


def decode(frame: bytes, *, max_frame: int = BIG, max_body: int = BIG) -> list[Message]:
    return decode_frame(frame, max_frame=max_frame, max_body=max_body)


def refused(call: Any, *args: Any, **kwargs: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        call(*args, **kwargs)
    return info.value


def only_protocol_errors(call: Any, *args: Any, **kwargs: Any) -> Any:
    """Call; a `ProtocolError` is a fine answer to bad input, any other exception is a bug."""
    try:
        return call(*args, **kwargs)
    except ProtocolError as exc:
        # Not pytest.raises: raising is allowed here, not required.
        assert exc.close in (CloseCode.PROTOCOL_ERROR, CloseCode.FRAME_TOO_LARGE)  # noqa: PT017
        assert exc.code in (ErrorCode.PROTOCOL_ERROR, ErrorCode.FRAME_TOO_LARGE)  # noqa: PT017
        return None


# --- lib0 primitives ----------------------------------------------------------------------


@given(st.integers(0, MAX_SAFE), st.binary(max_size=8))
def test_varuint_round_trips(value: int, tail: bytes) -> None:
    reader = Reader(write_varuint(value) + tail)
    assert reader.varuint() == value
    assert reader.rest() == tail


@example(0x7F)
@example(0x80)
@example(MAX_SAFE)
@given(st.integers(0, MAX_SAFE))
def test_varuint_is_lib0(value: int) -> None:
    encoded = write_varuint(value)
    assert all(byte & 0x80 for byte in encoded[:-1])
    assert encoded[-1] < 0x80
    assert len(encoded) == max(1, -(-value.bit_length() // 7))


@given(st.dictionaries(st.integers(0, MAX_SAFE), st.integers(0, 1 << 32), max_size=300))
def test_state_entries_are_the_state_vector_left_encoded(clocks: dict[int, int]) -> None:
    encoded = write_varuint(len(clocks)) + b"".join(
        write_varuint(client) + write_varuint(clock) for client, clock in clocks.items()
    )
    entries = state_entries(encoded)
    assert entries == {write_varuint(c): write_varuint(k) for c, k in clocks.items()}
    assert {varuint_value(c): varuint_value(k) for c, k in entries.items()} == clocks
    assert decode_state_vector(encoded) == clocks


def test_state_entries_read_what_yrs_writes() -> None:
    doc: Doc[Any] = Doc()
    for n in range(200):
        writer: Doc[Any] = Doc(client_id=(n + 1) * 2_654_435_761)
        writer.get("notes", type=Text).insert(0, "x" * (n + 1))
        doc.apply_update(writer.get_update())
    state = doc.get_state()
    entries = state_entries(state)
    assert {varuint_value(c): varuint_value(k) for c, k in entries.items()} == (
        decode_state_vector(state)
    )
    assert len(entries) == 200


@given(st.integers(0, MAX_SAFE), st.data())
def test_truncated_varuint_is_refused(value: int, data: st.DataObject) -> None:
    encoded = write_varuint(value)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    error = refused(Reader(encoded[:cut]).varuint)
    assert error.close is CloseCode.PROTOCOL_ERROR


@given(st.binary(min_size=8, max_size=20).map(lambda b: bytes(x | 0x80 for x in b)))
def test_endless_varuint_is_refused(data: bytes) -> None:
    # Eight continuation bytes are past 53 bits: refused without reading on.
    refused(Reader(data).varuint)


@given(st.integers(1 << 56, 1 << 64))
def test_varuint_past_56_bits_is_refused(value: int) -> None:
    refused(Reader(write_varuint(value)).varuint)


@given(utf8_text, st.binary(max_size=8))
def test_varstring_round_trips(text: str, tail: bytes) -> None:
    reader = Reader(write_varstring(text) + tail)
    assert reader.varstring() == text
    assert reader.remaining == len(tail)


@given(st.binary(max_size=64))
def test_varstring_of_any_bytes(data: bytes) -> None:
    reader = Reader(write_varbytes(data))
    try:
        expected: str | None = data.decode()
    except UnicodeDecodeError:
        expected = None
    if expected is None:
        refused(reader.varstring)
    else:
        assert reader.varstring() == expected


@given(st.binary(max_size=64), st.integers(1, 1000))
def test_varbytes_longer_than_the_message_is_refused(data: bytes, missing: int) -> None:
    encoded = write_varuint(len(data) + missing) + data
    refused(Reader(encoded).varbytes)


# --- frames: round trips ------------------------------------------------------------------


@given(st.lists(messages, min_size=1, max_size=12), compressors, st.sampled_from([0, 256]))
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_frames_round_trip(batch: list[Message], compressor: Any, threshold: int) -> None:
    frame = encode_frame(
        [encode_body(m) for m in batch], compressor=compressor, compress_above=threshold
    )
    assert decode(frame) == batch
    flags = frame[0]
    if compressor is None:
        assert flags == 0
    body = decompress(frame[1:], BIG) if flags & FLAG_ZSTD else frame[1:]
    assert Reader(body).varuint() == (Kind.BATCH if len(batch) > 1 else type_kind(batch[0]))


def type_kind(message: Message) -> Kind:
    return Kind.CONTROL if isinstance(message, Control) else Kind.DOC


def test_empty_batch_round_trips() -> None:
    assert decode(encode_frame([])) == []
    assert decode(encode_frame([], compressor=zstandard.ZstdCompressor(), compress_above=0)) == []


def test_compressed_frames_are_zstd() -> None:
    body = encode_body(Control({"type": "hello", "pad": "x" * 1000}))
    frame = encode_frame([body], compressor=zstandard.ZstdCompressor())
    assert frame[0] == FLAG_ZSTD
    assert len(frame) < len(body)
    # Below the threshold the frame stays plain: zstd would make a small body bigger.
    small = encode_body(Control({"type": "ack"}))
    assert encode_frame([small], compressor=zstandard.ZstdCompressor())[0] == 0


@given(messages)
def test_body_round_trips(message: Message) -> None:
    assert decode_body(encode_body(message), allow_batch=False) == [message]


# --- frames: whatever the bytes, only ProtocolError ----------------------------------------


def raw_frames() -> st.SearchStrategy[bytes]:
    """Bytes that reach past the first checks: a flags byte, a kind, then anything."""
    kinds = st.integers(0, 300).map(write_varuint)
    structured = st.builds(
        lambda flags, kind, payload: bytes([flags]) + kind + payload,
        st.sampled_from([0, 0, 0, 1, 2, 0x80, 0xFF]),
        kinds,
        st.binary(max_size=200),
    )
    batches = st.builds(
        lambda count, entries, tail: (
            b"\x00" + write_varuint(Kind.BATCH) + write_varuint(count) + b"".join(entries) + tail
        ),
        st.integers(0, 20),
        st.lists(st.binary(max_size=40).map(write_varbytes), max_size=20),
        st.binary(max_size=4),
    )
    compressed = st.binary(max_size=200).map(
        lambda body: bytes([FLAG_ZSTD]) + zstandard.ZstdCompressor().compress(body)
    )
    return st.one_of(st.binary(max_size=300), structured, batches, compressed)


@given(raw_frames())
@settings(max_examples=1000)
def test_decode_frame_raises_only_protocol_errors(frame: bytes) -> None:
    only_protocol_errors(decode, frame)
    only_protocol_errors(decode, frame, max_frame=16, max_body=8)


@given(st.lists(messages, min_size=1, max_size=6), compressors, st.data())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_mutated_frames_raise_only_protocol_errors(
    batch: list[Message], compressor: Any, data: st.DataObject
) -> None:
    frame = bytearray(encode_frame([encode_body(m) for m in batch], compressor=compressor))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(frame) - 1))
        frame[at] = data.draw(st.integers(0, 255))
    only_protocol_errors(decode, bytes(frame))


@given(st.lists(messages, min_size=1, max_size=6), compressors, st.data())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_truncated_frames_are_refused_or_a_prefix(
    batch: list[Message], compressor: Any, data: st.DataObject
) -> None:
    frame = encode_frame([encode_body(m) for m in batch], compressor=compressor)
    cut = data.draw(st.integers(0, len(frame) - 1))
    only_protocol_errors(decode, frame[:cut])


def test_empty_frame_is_refused() -> None:
    assert refused(decode, b"").close is CloseCode.PROTOCOL_ERROR


@given(st.integers(0, 255).filter(lambda f: f & ~FLAG_ZSTD), st.lists(messages, max_size=3))
def test_unknown_flags_are_refused(flags: int, batch: list[Message]) -> None:
    body = encode_frame([encode_body(m) for m in batch])[1:]
    error = refused(decode, bytes([flags]) + body)
    assert error.close is CloseCode.PROTOCOL_ERROR
    assert "flags" in error.message


@given(st.integers(3, MAX_SAFE), st.binary(max_size=40), st.booleans())
def test_unknown_kinds_are_refused(kind: int, payload: bytes, compress: bool) -> None:
    body = write_varuint(kind) + payload
    frame = (
        bytes([FLAG_ZSTD]) + zstandard.ZstdCompressor().compress(body) if compress else b"\0" + body
    )
    error = refused(decode, frame)
    assert error.close is CloseCode.PROTOCOL_ERROR
    assert "kind" in error.message


@given(st.lists(messages, min_size=1, max_size=4))
def test_nested_batch_is_refused(batch: list[Message]) -> None:
    inner = encode_frame([encode_body(m) for m in batch] + [encode_body(batch[0])])[1:]
    assert Reader(inner).varuint() == Kind.BATCH
    outer = encode_frame([inner, encode_body(batch[0])])
    error = refused(decode, outer)
    assert error.close is CloseCode.PROTOCOL_ERROR


def test_batch_limits() -> None:
    one = write_varbytes(encode_body(Control({"type": "x"})))
    too_long = b"\0" + write_varuint(Kind.BATCH) + write_varuint(MAX_BATCH + 1) + one
    assert "batch too long" in refused(decode, too_long).message
    trailing = b"\0" + write_varuint(Kind.BATCH) + write_varuint(1) + one + b"\0"
    assert "after the last" in refused(decode, trailing).message
    short = b"\0" + write_varuint(Kind.BATCH) + write_varuint(2) + one
    refused(decode, short)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"[]",
        b'"hello"',
        b"{}",
        b'{"type": 1}',
        b'{"type": null}',
        b'{"type": "x"',
        b'{"type": "\xff"}',
        b'{"type": "\\ud800"}',
        b"[" * 5000 + b"]" * 5000,
        b'{"type":"x","a":' + b"[" * 2000 + b"]" * 2000 + b"}",
        b'{"type":"x","n":1e400}',
    ],
)
def test_bad_control_messages_are_refused(payload: bytes) -> None:
    error = refused(decode, b"\0" + write_varuint(Kind.CONTROL) + payload)
    assert error.close is CloseCode.PROTOCOL_ERROR


def test_control_type_must_be_a_string() -> None:
    assert Control({"type": 3}).type == ""
    control = decode(b"\0\0" + orjson.dumps({"type": "hello", "x": 1}))[0]
    assert isinstance(control, Control)
    assert control.type == "hello"


def test_doc_message_needs_a_y_message() -> None:
    body = write_varuint(Kind.DOC) + write_varstring("wo:1")
    assert "without a y-protocols message" in refused(decode, b"\0" + body).message
    refused(decode, b"\0" + write_varuint(Kind.DOC) + b"\x05wo")  # doc id past the end
    refused(decode, b"\0" + write_varuint(Kind.DOC) + b"\x02\xff\xfe\x00")  # not UTF-8


# --- sizes: frames, bodies and zstd bombs -------------------------------------------------


@given(st.integers(1, 200), st.integers(1, 50))
def test_frame_over_max_frame(max_frame: int, over: int) -> None:
    frame = b"\0" + encode_body(Control({"type": "x", "pad": "p" * (max_frame + over)}))
    error = refused(decode, frame, max_frame=max_frame, max_body=BIG)
    assert error.close is CloseCode.FRAME_TOO_LARGE
    assert error.code is ErrorCode.FRAME_TOO_LARGE


def test_frame_at_max_frame_passes() -> None:
    frame = b"\0" + encode_body(Control({"type": "x"}))
    assert decode(frame, max_frame=len(frame), max_body=len(frame) - 1)


def test_plain_body_over_max_body() -> None:
    frame = b"\0" + encode_body(Control({"type": "x", "pad": "p" * 100}))
    error = refused(decode, frame, max_frame=BIG, max_body=50)
    assert error.close is CloseCode.FRAME_TOO_LARGE


def test_compressed_body_at_the_limit_passes() -> None:
    body = encode_body(Control({"type": "x", "pad": "p" * 5000}))
    for declared in (True, False):
        compressed = zstandard.ZstdCompressor(write_content_size=declared).compress(body)
        frame = bytes([FLAG_ZSTD]) + compressed
        assert decode(frame, max_frame=BIG, max_body=len(body)) == [Control(orjson.loads(body[1:]))]
        error = refused(decode, frame, max_frame=BIG, max_body=len(body) - 1)
        assert error.close is CloseCode.FRAME_TOO_LARGE


def bomb(size: int, *, declared: bool) -> bytes:
    body = write_varuint(Kind.CONTROL) + b" " * size
    compressor = zstandard.ZstdCompressor(level=1, write_content_size=declared)
    return bytes([FLAG_ZSTD]) + compressor.compress(body)


def peak_allocation(call: Any) -> int:
    tracemalloc.start()
    try:
        call()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("declared", [True, False], ids=["declared", "undeclared"])
def test_zstd_bomb_costs_at_most_the_limit(declared: bool) -> None:
    limit = 256 << 10
    frame = bomb(10 << 20, declared=declared)  # 10 MB of output in a frame of a few hundred B
    assert len(frame) < 2048
    if not declared:
        assert zstandard.frame_content_size(frame[1:]) == -1
    errors: list[ProtocolError] = []

    def attempt() -> None:
        errors.append(refused(decode, frame, max_frame=1 << 20, max_body=limit))

    peak = peak_allocation(attempt)
    assert errors[0].close is CloseCode.FRAME_TOO_LARGE
    assert errors[0].code is ErrorCode.FRAME_TOO_LARGE
    assert peak < (limit + (64 << 10) if not declared else 64 << 10), peak


@given(st.sampled_from([b"", b"\x28\xb5\x2f", b"\x28\xb5\x2f\xfd", b"not zstd at all"]))
def test_flagged_body_that_is_not_zstd(body: bytes) -> None:
    assert refused(decode, bytes([FLAG_ZSTD]) + body).close is CloseCode.PROTOCOL_ERROR


def test_skippable_zstd_frame_is_refused() -> None:
    skippable = b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"abcd"
    refused(decode, bytes([FLAG_ZSTD]) + skippable)


@pytest.mark.parametrize("declared", [True, False], ids=["declared", "undeclared"])
@given(data=st.data())
@settings(max_examples=50)
def test_truncated_zstd_frame_is_refused(declared: bool, data: st.DataObject) -> None:
    # A CONTROL message padded with JSON whitespace parses whatever its length: were a truncated
    # zstd frame decoded to the prefix it holds, this frame would be accepted.
    body = write_varuint(Kind.CONTROL) + b'{"type":"x"}' + b" \n\t\r" * 50_000
    compressed = zstandard.ZstdCompressor(write_content_size=declared).compress(body)
    frame = bytes([FLAG_ZSTD]) + compressed
    assert decode(frame) == [Control({"type": "x"})]
    cut = data.draw(st.integers(1, len(frame) - 1))
    refused(decode, frame[:cut])


def test_two_zstd_frames_are_not_one() -> None:
    body = encode_body(Control({"type": "x"}))
    one = zstandard.ZstdCompressor().compress(body)
    refused(decode, bytes([FLAG_ZSTD]) + one + one)
    refused(decode, bytes([FLAG_ZSTD]) + one + b"trailing")


# --- y-protocols messages -----------------------------------------------------------------


@given(st.sampled_from(list(SyncStep)), st.binary(max_size=200))
def test_sync_messages_round_trip(step: SyncStep, payload: bytes) -> None:
    assert decode_y(encode_sync(step, payload)) == YSync(step, payload)


@given(st.binary(max_size=200))
def test_awareness_round_trips(payload: bytes) -> None:
    assert decode_y(encode_awareness(payload)) == YAwareness(payload)


def test_other_y_messages() -> None:
    assert decode_y(bytes([YMessage.AUTH, 0])) == YOther(YMessage.AUTH)
    assert decode_y(bytes([YMessage.QUERY_AWARENESS])) == YOther(YMessage.QUERY_AWARENESS)
    assert "unknown y-protocols" in refused(decode_y, bytes([4, 0, 0])).message
    assert "unknown sync step" in refused(decode_y, bytes([YMessage.SYNC, 3, 0])).message
    refused(decode_y, b"")
    refused(decode_y, bytes([YMessage.SYNC]))
    refused(decode_y, bytes([YMessage.SYNC, SyncStep.UPDATE, 5, 1]))


def y_messages() -> st.SearchStrategy[bytes]:
    headed = st.builds(
        lambda kind, step, payload: write_varuint(kind) + write_varuint(step) + payload,
        st.integers(0, 5),
        st.integers(0, 5),
        st.binary(max_size=100),
    )
    return st.one_of(st.binary(max_size=200), headed)


@given(y_messages())
@settings(max_examples=1000)
def test_decode_y_raises_only_protocol_errors(message: bytes) -> None:
    only_protocol_errors(decode_y, message)


@given(st.dictionaries(st.integers(0, MAX_SAFE), st.integers(0, MAX_SAFE), max_size=20))
def test_state_vectors_round_trip(entries: dict[int, int]) -> None:
    encoded = write_varuint(len(entries)) + b"".join(
        write_varuint(client) + write_varuint(clock) for client, clock in entries.items()
    )
    assert decode_state_vector(encoded) == entries


@given(st.lists(utf8_text, min_size=1, max_size=5))
def test_state_vector_of_a_pycrdt_doc(edits: list[str]) -> None:
    doc: Doc[Any] = Doc()
    text = doc.get("t", type=Text)
    for edit in edits:
        text += edit
    state = decode_state_vector(doc.get_state())
    assert set(state) == ({doc.client_id} if "".join(edits) else set())
    assert all(clock > 0 for clock in state.values())


@given(st.binary(max_size=200))
@settings(max_examples=1000)
def test_decode_state_vector_raises_only_protocol_errors(data: bytes) -> None:
    only_protocol_errors(decode_state_vector, data)


def test_state_vector_count_past_its_bytes() -> None:
    assert "longer than its bytes" in refused(decode_state_vector, b"\x7f\x01\x01").message
    refused(decode_state_vector, b"\x02\x01\x01\x02")
