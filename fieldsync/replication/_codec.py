"""The `fieldsync.v1` wire format: frames, zstd, the three body kinds, and y-protocols messages.

Pure functions from bytes to typed messages and back; every malformed input raises
`ProtocolError` (never another exception), which the fuzz tests hold it to.

    frame = flags:u8 body            flags bit 0: body is one zstd frame
    body  = kind:varuint payload     0 CONTROL (JSON), 1 DOC (varstring doc id + y message),
                                     2 BATCH (count:varuint, count x (len:varuint body))
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import orjson
import zstandard

from fieldsync.errors import CloseCode, ProtocolError

FLAG_ZSTD = 0x01
# lib0 integers stop at 53 bits (JavaScript's safe integers); eight 7-bit groups hold them.
_MAX_VARUINT_BYTES = 8
MAX_BATCH = 10_000
# What a replica answers a SyncStep1 with while it holds nothing the other lacks (no structs, no
# deletions): no write. Before the document exists (or enters the scope) it must not be judged
# as an attempt to create it, or every device of a role that may create only in its own scope
# would be refused on opening an id it is about to create, and an id outside the scope would not
# look like an absent one.
EMPTY_UPDATE = b"\x00\x00"


class Kind(IntEnum):
    CONTROL = 0
    DOC = 1
    BATCH = 2


class YMessage(IntEnum):
    """y-protocols top-level message types (y-protocols/sync.js, awareness.js)."""

    SYNC = 0
    AWARENESS = 1
    AUTH = 2
    QUERY_AWARENESS = 3


class SyncStep(IntEnum):
    STEP1 = 0
    STEP2 = 1
    UPDATE = 2


@dataclass(frozen=True, slots=True)
class Control:
    body: dict[str, Any]

    @property
    def type(self) -> str:
        value = self.body.get("type")
        return value if isinstance(value, str) else ""


@dataclass(frozen=True, slots=True)
class DocMessage:
    doc: str
    message: bytes  # one y-protocols message, byte-compatible with Yjs


Message = Control | DocMessage


# --- lib0 varuint / varstring -------------------------------------------------------------


def write_varuint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)


def write_varbytes(data: bytes) -> bytes:
    return write_varuint(len(data)) + data


def write_varstring(text: str) -> bytes:
    return write_varbytes(text.encode())


class Reader:
    """A cursor over bytes that reads lib0 primitives, refusing truncated or oversized input."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def varuint(self) -> int:
        value = 0
        shift = 0
        for _ in range(_MAX_VARUINT_BYTES):
            if self.pos >= len(self.data):
                raise ProtocolError("truncated varuint")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
        raise ProtocolError("varuint too long")

    def varbytes(self) -> bytes:
        length = self.varuint()
        if length > self.remaining:
            raise ProtocolError("length past the end of the message")
        start = self.pos
        self.pos += length
        return self.data[start : self.pos]

    def varstring(self) -> str:
        try:
            return self.varbytes().decode()
        except UnicodeDecodeError:
            raise ProtocolError("string is not UTF-8") from None

    def rest(self) -> bytes:
        data = self.data[self.pos :]
        self.pos = len(self.data)
        return data


# --- frames -------------------------------------------------------------------------------


def decompress(data: bytes, limit: int) -> bytes:
    """Decompress one zstd frame, refusing output past `limit` whether the frame declares its
    size or not (a zstd bomb must cost at most `limit` bytes of memory)."""
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        raise ProtocolError("body is not a zstd frame") from None
    if declared > limit:
        raise ProtocolError("zstd frame declares more than the limit", CloseCode.FRAME_TOO_LARGE)
    try:
        # One-shot decompression refuses a truncated frame (a stream reader would return the
        # prefix it holds) and bytes after the frame; its output buffer is at most `limit`.
        return zstandard.ZstdDecompressor().decompress(
            data, max_output_size=limit, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        error = exc
    # Refused: corrupt or truncated, or it expands past `limit`; a bounded read tells which.
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
            expands = len(reader.read(limit + 1)) > limit
    except zstandard.ZstdError:
        expands = False
    if expands:
        raise ProtocolError("zstd frame expands past the limit", CloseCode.FRAME_TOO_LARGE)
    raise ProtocolError(f"bad zstd frame: {error}")


def decode_frame(frame: bytes, *, max_frame: int, max_body: int) -> list[Message]:
    """One WebSocket message to the messages it carries (a BATCH carries many)."""
    if len(frame) > max_frame:
        raise ProtocolError("frame too large", CloseCode.FRAME_TOO_LARGE)
    if not frame:
        raise ProtocolError("empty frame")
    flags = frame[0]
    if flags & ~FLAG_ZSTD:
        raise ProtocolError("unknown frame flags")
    body = frame[1:]
    if flags & FLAG_ZSTD:
        body = decompress(body, max_body)
    elif len(body) > max_body:
        raise ProtocolError("frame too large", CloseCode.FRAME_TOO_LARGE)
    return decode_body(body, allow_batch=True)


def decode_body(body: bytes, *, allow_batch: bool) -> list[Message]:
    reader = Reader(body)
    kind = reader.varuint()
    if kind == Kind.CONTROL:
        return [_decode_control(reader.rest())]
    if kind == Kind.DOC:
        doc = reader.varstring()
        message = reader.rest()
        if not message:
            raise ProtocolError("DOC message without a y-protocols message")
        return [DocMessage(doc, message)]
    if kind == Kind.BATCH and allow_batch:
        count = reader.varuint()
        if count > MAX_BATCH:
            raise ProtocolError("batch too long")
        messages: list[Message] = []
        for _ in range(count):
            messages.extend(decode_body(reader.varbytes(), allow_batch=False))
        if reader.remaining:
            raise ProtocolError("bytes after the last batch entry")
        return messages
    raise ProtocolError(f"unknown message kind {kind}")


def _decode_control(payload: bytes) -> Control:
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise ProtocolError("control message is not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("type"), str):
        raise ProtocolError("control message must be an object with a string `type`")
    return Control(body)


def encode_body(message: Message) -> bytes:
    if isinstance(message, Control):
        return write_varuint(Kind.CONTROL) + orjson.dumps(message.body)
    return write_varuint(Kind.DOC) + write_varstring(message.doc) + message.message


def encode_frame(
    bodies: list[bytes],
    *,
    compressor: zstandard.ZstdCompressor | None = None,
    compress_above: int = 256,
) -> bytes:
    """Bodies (from `encode_body`) to one frame: a BATCH when there are several; zstd when a
    compressor is given and the body is large enough to gain from it (a lone small update grows
    under zstd, DESIGN.md §9)."""
    if len(bodies) == 1:
        body = bodies[0]
    else:
        parts = [write_varuint(Kind.BATCH), write_varuint(len(bodies))]
        for item in bodies:
            parts.append(write_varbytes(item))
        body = b"".join(parts)
    if compressor is not None and len(body) > compress_above:
        return bytes([FLAG_ZSTD]) + compressor.compress(body)
    return b"\x00" + body


# --- y-protocols messages -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class YSync:
    step: SyncStep
    payload: bytes  # state vector for STEP1, an update for STEP2 and UPDATE


@dataclass(frozen=True, slots=True)
class YAwareness:
    payload: bytes


@dataclass(frozen=True, slots=True)
class YOther:
    """Auth and query-awareness messages: understood, nothing to apply."""

    type: YMessage


YMsg = YSync | YAwareness | YOther


def decode_y(message: bytes) -> YMsg:
    reader = Reader(message)
    kind = reader.varuint()
    if kind == YMessage.SYNC:
        step = reader.varuint()
        if step not in (SyncStep.STEP1, SyncStep.STEP2, SyncStep.UPDATE):
            raise ProtocolError(f"unknown sync step {step}")
        return YSync(SyncStep(step), reader.varbytes())
    if kind == YMessage.AWARENESS:
        return YAwareness(reader.varbytes())
    if kind in (YMessage.AUTH, YMessage.QUERY_AWARENESS):
        return YOther(YMessage(kind))
    raise ProtocolError(f"unknown y-protocols message type {kind}")


def encode_sync(step: SyncStep, payload: bytes) -> bytes:
    return bytes((YMessage.SYNC, step)) + write_varbytes(payload)


def encode_awareness(payload: bytes) -> bytes:
    return bytes((YMessage.AWARENESS,)) + write_varbytes(payload)


# One lib0 varuint: its continuation bytes (high bit set), then its last byte.
_VARUINT = re.compile(rb"[\x80-\xff]*[\x00-\x7f]")


def state_entries(sv: bytes) -> dict[bytes, bytes]:
    """The entries of a state vector yrs encoded, client id -> clock, both left lib0-encoded:
    two state vectors compare in C however many client ids a document has collected (every
    start of an app brings a new one; decoding a hundred in Python takes ~130 µs). For yrs's
    own output only: nothing here is checked."""
    tokens = _VARUINT.findall(sv)
    return dict(zip(tokens[1::2], tokens[2::2], strict=True))


def varuint_value(encoded: bytes) -> int:
    """The value of one lib0-encoded varuint (an entry of `state_entries`)."""
    return Reader(encoded).varuint()


def decode_state_vector(sv: bytes) -> dict[int, int]:
    """A Yjs v1 state vector (count, then client id / clock pairs) as a dict."""
    reader = Reader(sv)
    count = reader.varuint()
    if count > reader.remaining:
        raise ProtocolError("state vector longer than its bytes")
    entries = {}
    for _ in range(count):
        client = reader.varuint()
        entries[client] = reader.varuint()
    return entries
