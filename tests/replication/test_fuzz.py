"""Malformed input at a running server: every bad frame gets its documented answer, and the
devices syncing real edits meanwhile lose nothing (DESIGN.md §3).

The answers: an `error` control message for a problem with one document (the connection stays
open), a close code for a problem with the connection (4400 protocol error, 4401 token, 4408 auth
timeout, 4413 frame too large, 4429 rate limited; 4403 for a y-websocket document out of scope).
Never 1011, an abnormal close, an exception in the server's log, or a disturbed device.

`FIELDSYNC_FUZZ_SEED` replays a run; `FIELDSYNC_FUZZ_FRAMES` sets how many malformed frames.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
import zstandard
from pycrdt import Array, Doc, Map, Text

from fieldsync import documents
from fieldsync.client import Client
from fieldsync.errors import CloseCode, ProtocolError
from fieldsync.replication import Control, DocMessage, SyncStep, decode_frame, decode_y
from fieldsync.replication._awareness import decode_update, encode_update
from fieldsync.replication._codec import (
    FLAG_ZSTD,
    MAX_BATCH,
    Kind,
    Reader,
    YMessage,
    YSync,
    encode_awareness,
    encode_body,
    encode_frame,
    encode_sync,
    write_varbytes,
    write_varuint,
)
from tests.harness import Server, eventually, stored_doc, work_order
from tests.wire import connect

SEED = int(os.environ.get("FIELDSYNC_FUZZ_SEED", "20261130"))
FRAMES = int(os.environ.get("FIELDSYNC_FUZZ_FRAMES", "10000"))
MAX_FRAME = 1 << 20  # the server's default `max_frame`
RATE, BURST, AUTH_TIMEOUT = 400.0, 800.0, 3.0
WORKERS = 6

# Real work orders that the healthy devices edit throughout (team north, region east).
HEALTHY = {"wo:h1": "tina", "wo:h2": "tom", "wo:h3": "tina"}
# Work orders of another team that one fuzzing principal (sue) may write: mutated updates go
# there, where they may be accepted without touching what the healthy devices see.
OWN = ("wo:fz1", "wo:fz2", "wo:fz3")
QUIET = "wo:fz0"  # sue's too, never mutated: her connections replicate it (relayed awareness)
# Who fuzzes as whom, with the documents in their scope and some outside it.
FUZZERS = {
    "tina": {"scope": ["wo:h1", "wo:h3"], "outside": ["wo:h2", *OWN]},
    "sam": {"scope": list(HEALTHY), "outside": list(OWN)},
    "sue": {"scope": list(OWN), "outside": list(HEALTHY)},
    "ulla": {"scope": [], "outside": [*HEALTHY, *OWN]},
}

ACK, STEP2 = "ack", "step2"
Answer = frozenset[str]  # what one message may be answered with (error codes, ack, step2)
ONE_ERROR = frozenset({"invalid_update"})


@pytest.fixture
def server_settings() -> dict[str, Any]:
    # A low rate limit and a short auth timeout, so that 4429 and 4408 are cheap to reach.
    return {"rate": RATE, "burst": BURST, "auth_timeout": AUTH_TIMEOUT}


# --- what was sent, what came back ---------------------------------------------------------


@dataclass
class Tally:
    frames: Counter[str] = field(default_factory=Counter)  # malformed frames sent, by category
    messages: int = 0  # messages inside them (a BATCH carries several)
    connections: Counter[str] = field(default_factory=Counter)
    closes: Counter[str] = field(default_factory=Counter)  # "4400 protocol_error", ...
    answers: Counter[str] = field(default_factory=Counter)  # error codes, ack, step2
    other: Counter[str] = field(default_factory=Counter)  # reset, scope, relayed awareness
    failures: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.frames.values())

    def fail(self, what: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(what)


class Probe:
    """One raw connection: sends frames, counts the answers per document, records the close."""

    ws_kind = "v1"

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, tally: Tally) -> None:
        self.ws = ws
        self.tally = tally
        self.answers: dict[str, list[str]] = defaultdict(list)
        self.notices: Counter[str] = Counter()
        self.log: list[str] = []  # every answer in order, for the failure message
        self.controls: Counter[str] = Counter()
        self.y_messages = 0  # plain y-websocket: messages received
        self.close: tuple[int, str] | None = None
        self.arrived = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            message = await self.ws.receive()
            if message.type is aiohttp.WSMsgType.BINARY:
                self._receive(message.data)
            else:
                reason = str(message.extra or "") if message.type is aiohttp.WSMsgType.CLOSE else ""
                self.close = (self.ws.close_code or 1006, reason)
                self.arrived.set()
                return
            self.arrived.set()

    def _receive(self, frame: bytes) -> None:
        if self.ws_kind == "yws":
            self.y_messages += 1
            y = decode_y(frame)
            if isinstance(y, YSync) and y.step is SyncStep.STEP2:
                self.answers[""].append(STEP2)
            return
        for message in decode_frame(frame, max_frame=1 << 30, max_body=1 << 30):
            if isinstance(message, Control):
                kind = message.type
                self.controls[kind] += 1
                if kind in ("error", "reset", "ack"):
                    self.log.append(
                        f"{kind} {message.body.get('doc', '')[:20]} "
                        f"{message.body.get('code', message.body.get('reason', ''))}"
                    )
                if kind == "error" and message.body["code"] == "rule_violation":
                    # Not an answer: a notice that follows the ack of an accepted update whose
                    # merge the rules corrected.
                    self.notices[message.body["doc"]] += 1
                elif kind == "error":
                    self.answers[message.body.get("doc", "")].append(message.body["code"])
                elif kind == "ack":
                    self.answers[message.body["doc"]].append(ACK)
                elif kind in ("reset", "scope"):
                    self.tally.other[kind] += 1
            else:
                y = decode_y(message.message)
                if isinstance(y, YSync) and y.step is SyncStep.STEP2:
                    self.answers[message.doc].append(STEP2)
                elif not isinstance(y, YSync):
                    self.tally.other["relayed awareness"] += 1

    def received(self) -> int:
        return sum(len(answers) for answers in self.answers.values())

    async def wait(self, predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not predicate():
                    self.arrived.clear()
                    await self.arrived.wait()
        return predicate()

    async def send(self, frame: bytes | str) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            if isinstance(frame, str):
                await self.ws.send_str(frame)
            else:
                await self.ws.send_bytes(frame)

    async def closed(self, timeout: float = 20.0) -> tuple[int, str] | None:
        await self.wait(lambda: self.close is not None, timeout)
        return self.close

    async def finish(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.reader


class YwsProbe(Probe):
    ws_kind = "yws"


# --- malformed input -----------------------------------------------------------------------


@dataclass
class DocSend:
    """One DOC message and what it may be answered with (None: nothing)."""

    doc: str
    y: bytes
    answer: Answer | None
    category: str


def y_update(payload: bytes, step: SyncStep = SyncStep.UPDATE) -> bytes:
    return encode_sync(step, payload)


def claims_too_much(data: bytes) -> bool:
    """A leading entry count beyond the bytes: refused before pycrdt sees it (which would
    reserve memory for every claimed entry first)."""
    reader = Reader(data)
    try:
        return reader.varuint() > reader.remaining
    except ProtocolError:
        return False


def refused_by_pycrdt(update: bytes) -> bool:
    """Whether pycrdt fails to decode `update` (ValueError: nothing of it can be applied)."""
    if claims_too_much(update):
        return True
    try:
        Doc().apply_update(update)
    except ValueError:
        return True
    except BaseException:  # a pyo3 panic, or an error after part of it was applied
        return False
    return False


def bad_state_vector(sv: bytes) -> bool:
    if claims_too_much(sv):
        return True
    try:
        Doc().get_update(sv)
    except ValueError:
        return True
    except BaseException:  # a pyo3 panic, or an error after part of it was applied
        return False
    return False


def local_verdict(frame: bytes) -> ProtocolError | None:
    """The codec's verdict on a frame (its own property tests hold it to the spec)."""
    try:
        decode_frame(frame, max_frame=MAX_FRAME, max_body=8 << 20)
    except ProtocolError as exc:
        return exc
    return None


class Fuzz:
    """A seeded source of malformed frames, each with the answer DESIGN.md §3 promises."""

    def __init__(self, seed: int, own: dict[str, Doc[Any]], tokens: dict[str, str]) -> None:
        self.rng = random.Random(seed)
        self.own = own
        self.tokens = tokens
        self.serial = 0
        zero = zstandard.ZstdCompressor(level=1)
        body = write_varuint(Kind.CONTROL) + b" " * (9 << 20)
        self.bombs = {
            "declared": bytes([FLAG_ZSTD]) + zero.compress(body),
            "undeclared": bytes([FLAG_ZSTD])
            + zstandard.ZstdCompressor(level=1, write_content_size=False).compress(body),
        }
        padded = write_varuint(Kind.CONTROL) + b'{"type":"x"}' + b" " * 300_000
        self.truncatable = bytes([FLAG_ZSTD]) + zero.compress(padded)
        self.valid_updates = [work_order(f"wo:v{i}", team="north").get_update() for i in range(3)]
        self.closing_queue = list(self.closing(""))

    def next_id(self) -> int:
        self.serial += 1
        return self.serial

    def junk(self, low: int = 0, high: int = 64) -> bytes:
        return self.rng.randbytes(self.rng.randint(low, high))

    # ---- per-document messages (the connection stays open) ----

    def invalid_doc_id(self) -> str:
        rng, n = self.rng, self.next_id()
        return rng.choice(
            [
                "",
                f"wo:{n}" + "x" * rng.randint(64, 300),  # too long
                f"wo:-{n}",
                f"form:{n} space",
                f"task:{n}",
                f"wo:{n}/../etc",
                f"WO:{n}",
                f"wo:{n}é",
                f"wo:\x00{n}",
                f"{n}" + "".join(chr(rng.randint(32, 0xD7FF)) for _ in range(rng.randint(0, 40))),
                f"wo:{n}" + "\U0001f527" * rng.randint(1, 30),
            ]
        )

    def huge_count(self) -> bytes:
        """Eight bytes or so that claim up to 2^29 entries (a gigabyte, were they believed)."""
        return write_varuint(self.rng.randint(1 << 16, (1 << 29) - 1)) + self.junk(0, 6)

    def garbage_update(self) -> bytes:
        if self.rng.random() < 0.15:
            return self.huge_count()
        while True:
            payload = self.junk(0, 120)
            if refused_by_pycrdt(payload):
                return payload

    def garbage_state_vector(self) -> bytes:
        if self.rng.random() < 0.15:
            return self.huge_count()
        while True:
            sv = self.junk(1, 40)
            if bad_state_vector(sv):
                return sv

    def undecodable_y(self) -> bytes:
        rng = self.rng
        return rng.choice(
            [
                write_varuint(rng.randint(4, 1 << 20)) + self.junk(),  # unknown message type
                bytes([YMessage.SYNC]) + write_varuint(rng.randint(3, 300)) + self.junk(),
                bytes([YMessage.SYNC, rng.randint(0, 2)])
                + write_varuint(rng.randint(65, 1000))
                + self.junk(0, 64),  # length past the end
                bytes([YMessage.SYNC]),
                bytes([YMessage.AWARENESS]) + b"\xff\xff",  # truncated varint
                b"\x80" * rng.randint(1, 12),
            ]
        )

    def awareness(self) -> bytes:
        """A well-formed awareness update (relayed to the document's other replicas)."""
        rng = self.rng
        states = [
            (rng.randint(0, 1 << 32), rng.randint(0, 100), orjson.dumps({"cursor": rng.random()}))
            for _ in range(rng.randint(0, 3))
        ]
        return encode_update([(c, clock, state.decode()) for c, clock, state in states])

    def garbage_awareness(self) -> bytes:
        while True:
            payload = self.junk(1, 40)
            try:
                decode_update(payload)
            except ProtocolError:
                return encode_awareness(payload)

    def mutated(self, doc_id: str) -> bytes:
        """A real edit of one of sue's work orders, with a few bytes changed."""
        rng = self.rng
        replica: Doc[Any] = Doc()
        replica.apply_update(self.own[doc_id].get_update())
        before = replica.get_state()
        notes = replica.get("notes", type=Text)
        edit = rng.randint(0, 2)
        if edit == 0:
            notes.insert(rng.randint(0, len(str(notes))), f"m{rng.randint(0, 999)}")
        elif edit == 1:
            replica.get("fields", type=Map)[rng.choice(["title", "status", "x"])] = rng.random()
        else:
            replica.get("checklist", type=Array).append(Map({"id": f"c{rng.randint(2, 99)}"}))
        data = bytearray(replica.get_update(before) if rng.random() < 0.8 else replica.get_update())
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            choice = rng.random()
            if choice < 0.6:
                data[at] = rng.randrange(256)
            elif choice < 0.8 and len(data) > 2:
                del data[at]
            else:
                data.insert(at, rng.randrange(256))
        return bytes(data)

    def doc_send(self, subject: str, subscribed: str | None) -> DocSend:
        """One per-document message from `subject` (its `subscribed` document is left alone:
        it carries relayed awareness, which must not be interrupted by a reset)."""
        rng = self.rng
        fuzzer = FUZZERS[subject]
        scope = [d for d in fuzzer["scope"] if d != subscribed]
        roll = rng.random()
        if roll < 0.18:
            y = rng.choice([y_update(self.junk()), self.undecodable_y(), encode_awareness(b"")])
            return DocSend(self.invalid_doc_id(), y, frozenset({"invalid_doc_id"}), "bad doc id")
        if roll < 0.32 and scope:
            return DocSend(rng.choice(scope), self.undecodable_y(), ONE_ERROR, "undecodable y")
        if roll < 0.48 and scope and subject != "sue":
            step = rng.choice([SyncStep.STEP2, SyncStep.UPDATE])
            update = y_update(self.garbage_update(), step)
            return DocSend(rng.choice(scope), update, ONE_ERROR, "garbage update")
        if roll < 0.58 and scope:
            sv = y_update(self.garbage_state_vector(), SyncStep.STEP1)
            return DocSend(rng.choice(scope), sv, ONE_ERROR, "garbage state vector")
        if roll < 0.74 and subject == "sue":
            doc_id = rng.choice([d for d in OWN if d != subscribed])
            # Accepted, or refused: undecodable, building on what the server lacks (it could
            # not be checked), or writing a scope key outside her team.
            answer = frozenset({ACK, "invalid_update", "resync_required", "forbidden_field"})
            step = rng.choice([SyncStep.STEP2, SyncStep.UPDATE])
            return DocSend(doc_id, y_update(self.mutated(doc_id), step), answer, "mutated update")
        if roll < 0.84:
            doc_id = rng.choice(fuzzer["outside"])
            update = y_update(rng.choice(self.valid_updates))
            answer = frozenset({"forbidden"})
            if doc_id in OWN:  # an accepted mutation may have moved it into this scope
                answer |= {ACK}
            return DocSend(doc_id, update, answer, "outside the scope")
        if roll < 0.90:
            # Nothing of it exists: a technician may not create work orders; a supervisor's
            # garbage is refused when decoded or when its content is out of its team.
            doc_id = f"wo:nx-{self.next_id()}"
            if subject in ("tina", "ulla"):
                y = rng.choice([y_update(self.junk()), y_update(b"\x00", SyncStep.STEP1)])
                return DocSend(doc_id, y, frozenset({"forbidden"}), "absent document")
            update = y_update(self.garbage_update())
            return DocSend(doc_id, update, frozenset({"invalid_update", "forbidden"}), "absent")
        if roll < 0.95:
            # Awareness for a document this connection does not replicate.
            doc_id = f"wo:aw-{self.next_id()}"
            y = encode_awareness(self.junk())
            return DocSend(doc_id, y, frozenset({"forbidden"}), "awareness unsubscribed")
        target = rng.choice(scope) if scope else f"wo:q-{self.next_id()}"
        other = bytes([rng.choice([YMessage.AUTH, YMessage.QUERY_AWARENESS])]) + self.junk(0, 8)
        return DocSend(target, other, None, "auth/query-awareness")

    # ---- frames that close the connection ----

    def closing_frame(self, subject: str) -> tuple[bytes | str, set[int], str]:
        """A frame after `hello` that ends the connection, with the close codes it may get.
        The first ones go once through every kind; then they come by weight."""
        if self.closing_queue:
            category = self.closing_queue.pop()
        else:
            names = list(self.closing(subject))
            weights = [self.closing(subject)[n][0] for n in names]
            category = self.rng.choices(names, weights)[0]
        frame, codes = self.closing(subject)[category][1]()
        return frame, codes, category

    def closing(
        self, subject: str
    ) -> dict[str, tuple[float, Callable[[], tuple[bytes | str, set[int]]]]]:
        return {
            "random bytes": (20, self.random_bytes),
            "truncated varint": (8, self.truncated_varint),
            "unknown kind": (7, self.unknown_kind),
            "bad flags": (6, self.bad_flags),
            "oversized": (1.5, self.oversized),
            "zstd bomb (declared)": (1, lambda: (self.bombs["declared"], {4413})),
            "zstd bomb (undeclared)": (1, lambda: (self.bombs["undeclared"], {4413})),
            "truncated zstd": (4, self.truncated_zstd),
            "bad JSON control": (14, lambda: (b"\x00\x00" + self.bad_json(), {4400})),
            "nested BATCH": (6, self.nested_batch),
            "bad BATCH": (4, self.bad_batch),
            "hello twice": (6, self.hello_twice),
            "text frame": (6, lambda: (self.rng.choice(["hello", '{"type":"hello"}', ""]), {4400})),
            "bad auth": (14, lambda: self.bad_auth(subject)),
        }

    def random_bytes(self) -> tuple[bytes, set[int]]:
        rng = self.rng
        while True:
            frame = rng.choice(
                [self.junk(1, 200), b"\x00" + self.junk(1, 200), bytes([FLAG_ZSTD]) + self.junk()]
            )
            verdict = local_verdict(frame)
            if verdict is not None:
                return frame, {verdict.close}

    def truncated_varint(self) -> tuple[bytes, set[int]]:
        rng = self.rng
        return rng.choice([b"\x00\x80", b"\x00" + b"\xff" * rng.randint(1, 7), b"\x00\x01\x85"]), {
            4400
        }

    def unknown_kind(self) -> tuple[bytes, set[int]]:
        return b"\x00" + write_varuint(self.rng.randint(3, (1 << 53) - 1)) + self.junk(), {4400}

    def bad_flags(self) -> tuple[bytes, set[int]]:
        flags = self.rng.randint(2, 255)
        return bytes([flags]) + encode_body(Control({"type": "x"})), {4400}

    def oversized(self) -> tuple[bytes, set[int]]:
        size = MAX_FRAME + self.rng.randint(1, 4096)
        return b"\x00" + encode_body(Control({"type": "x", "pad": "p" * size})), {4413}

    def truncated_zstd(self) -> tuple[bytes, set[int]]:
        return self.truncatable[: self.rng.randint(1, len(self.truncatable) - 1)], {4400}

    def nested_batch(self) -> tuple[bytes, set[int]]:
        inner = encode_frame([encode_body(Control({"type": "x"}))] * 2)[1:]
        return encode_frame([inner, encode_body(Control({"type": "x"}))]), {4400}

    def bad_batch(self) -> tuple[bytes, set[int]]:
        count = self.rng.choice([MAX_BATCH + 1, 1 << 40, 3])
        one = write_varbytes(encode_body(Control({"type": "x"})))
        return b"\x00" + write_varuint(Kind.BATCH) + write_varuint(count) + one, {4400}

    def hello_twice(self) -> tuple[bytes, set[int]]:
        return encode_frame([encode_body(Control({"type": "hello", "client": {}}))]), {4400}

    def bad_auth(self, subject: str) -> tuple[bytes, set[int]]:
        """An in-band renewal with a token that is no token, or someone else's."""
        other = self.tokens["tom" if subject != "tom" else "tina"]
        token = self.rng.choice([self.junk_token(), "", "a.b.c", 5, None, "x" * 20_000, other])
        return encode_frame([encode_body(Control({"type": "auth", "token": token}))]), {4401}

    def bad_json(self) -> bytes:
        rng = self.rng
        return rng.choice(
            [
                b"",
                b"{",
                b"[]",
                b'"hello"',
                b"null",
                b"{}",
                b'{"type": 7}',
                b'{"type": ["hello"]}',
                b'{"type": "hello"',
                b'{"type": "\xff\xfe"}',
                b'{"type": "\\ud800"}',
                b'{"type":"x","n":1e999}',
                b"[" * rng.randint(1025, 5000),
                b'{"type":"x","a":' + b"[" * 2000 + b"]" * 2000 + b"}",
                self.junk(1, 100),
            ]
        )

    def junk_token(self) -> str:
        rng = self.rng
        alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_."
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 400)))

    def odd_hello(self) -> tuple[bytes, str]:
        """A `hello` with fields the server must shrug off (it still answers `welcome`)."""
        rng = self.rng
        deep = b"[" * 1000 + b"]" * 1000
        raw = rng.choice(
            [
                b'{"type":"hello","client":{"platform":' + deep + b"}}",
                b'{"type":"hello","client":{"version":' + deep + b',"device_id":{"a":1}}}',
                b'{"type":"hello","since":18446744073709551615}',
                b'{"type":"hello","since":9223372036854775808}',
                b'{"type":"hello","since":-5,"caps":"zstd"}',
                b'{"type":"hello","since":1.5,"client":[]}',
                b'{"type":"hello","since":true,"client":{"version":"9999999999999999999999.1"}}',
                b'{"type":"hello","client":"x","caps":[["zstd"]],"extra":{"a":[1,2]}}',
                b'{"type":"hello","client":{"platform":"' + b"p" * 5000 + b'"}}',
            ]
        )
        return b"\x00\x00" + raw, "odd hello"


# --- the plans: one connection each -------------------------------------------------------


class Campaign:
    def __init__(self, server: Server, http: aiohttp.ClientSession, fuzz: Fuzz) -> None:
        self.server = server
        self.http = http
        self.fuzz = fuzz
        self.rng = fuzz.rng
        self.tally = Tally()
        self.tokens = fuzz.tokens
        self.compressor = zstandard.ZstdCompressor()  # one: each new one costs megabytes

    async def connect(self, url: str, token: str | None, probe: type[Probe] = Probe) -> Probe:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        ws = await self.http.ws_connect(url, headers=headers, max_msg_size=0)
        return probe(ws, self.tally)

    def count(self, category: str, messages: int = 1) -> None:
        self.tally.frames[category] += 1
        self.tally.messages += messages

    def closed_as(self, close: tuple[int, str] | None, expected: set[int], what: str) -> None:
        code, reason = close if close is not None else (0, "no close")
        shown = re.sub(r"\d+", "N", reason.split(":")[0])[:40]
        self.tally.closes[f"{code} {shown}".strip()] += 1
        if code not in expected:
            self.tally.fail(f"{what}: closed {code} {reason!r}, expected {sorted(expected)}")

    async def hello(self, probe: Probe, subject: str) -> bool:
        client = {"platform": "fuzz", "version": "1.0", "device_id": f"fuzz-{subject}"}
        caps = self.rng.choice([[], ["zstd"], ["zstd", "batch"]])
        hello = Control({"type": "hello", "client": client, "since": 0, "caps": caps})
        await probe.send(encode_frame([encode_body(hello)]))
        if not await probe.wait(lambda: probe.controls["welcome"] > 0 or probe.close is not None):
            self.tally.fail(f"{subject}: no welcome")
            return False
        return probe.close is None

    async def v1(self, subject: str, frames: int, closing: bool) -> None:
        """hello, `frames` per-document frames, wait for every answer, then perhaps a frame that
        must close the connection."""
        self.tally.connections["v1"] += 1
        probe = await self.connect(self.server.sync_url, self.tokens[subject])
        try:
            if not await self.hello(probe, subject):
                return
            expected: dict[str, list[Answer]] = defaultdict(list)
            sent: dict[str, list[str]] = defaultdict(list)
            # A document this connection replicates: relayed awareness goes to its devices.
            scope = FUZZERS[subject]["scope"]
            subscribed = QUIET if subject == "sue" else self.rng.choice(scope) if scope else None
            if subscribed is not None:
                await probe.send(
                    self.frame([DocSend(subscribed, y_update(b"\x00", SyncStep.STEP1), None, "")])
                )
                expected[subscribed].append(frozenset({STEP2}))
            for _ in range(frames):
                sends = [self.fuzz.doc_send(subject, subscribed) for _ in range(self.batch_size())]
                if subscribed is not None and self.rng.random() < 0.15:
                    if self.rng.random() < 0.6:
                        awareness = self.fuzz.awareness()
                        sends.append(DocSend(subscribed, awareness, None, "relayed awareness"))
                    else:
                        awareness = self.fuzz.garbage_awareness()
                        sends.append(DocSend(subscribed, awareness, ONE_ERROR, "bad awareness"))
                if self.rng.random() < 0.05:
                    await probe.send(self.unknown_control())
                    self.count("unknown control type")
                for send in sends:
                    sent[send.doc[:80]].append(send.category)
                    if send.answer is not None:
                        expected[send.doc[:80]].append(send.answer)
                await probe.send(self.frame(sends))
                self.count(sends[0].category if len(sends) == 1 else "BATCH of DOC", len(sends))
            total = sum(len(v) for v in expected.values())
            await probe.wait(lambda: probe.received() >= total or probe.close is not None)
            self.check_answers(subject, probe, expected, sent)
            if probe.close is not None:
                self.tally.fail(f"{subject}: closed {probe.close} on per-document input")
                return
            if closing:
                frame, codes, category = self.fuzz.closing_frame(subject)
                await probe.send(frame)
                self.count(category)
                self.closed_as(await probe.closed(), codes, category)
        finally:
            await probe.finish()

    def batch_size(self) -> int:
        return 1 if self.rng.random() < 0.7 else self.rng.randint(2, 6)

    def frame(self, sends: list[DocSend]) -> bytes:
        bodies = [encode_body(DocMessage(s.doc, s.y)) for s in sends]
        compressor = self.compressor if self.rng.random() < 0.3 else None
        return encode_frame(bodies, compressor=compressor, compress_above=self.rng.choice([0, 256]))

    def unknown_control(self) -> bytes:
        body = {"type": self.rng.choice(["noop", "ping", "", "HELLO", "welcome", "ack"])}
        if self.rng.random() < 0.5:
            body["doc"] = self.fuzz.invalid_doc_id()
        return encode_frame([encode_body(Control(body))])

    def check_answers(
        self,
        subject: str,
        probe: Probe,
        expected: dict[str, list[Answer]],
        sent: dict[str, list[str]],
    ) -> None:
        for doc, answers in probe.answers.items():
            self.tally.answers.update(answers)
            allowed = expected.get(doc, [])
            if len(answers) != len(allowed):
                answered = [line for line in probe.log if doc[:20] in line]
                self.tally.fail(
                    f"{subject} {doc[:40]!r}: {len(answers)} answers {Counter(answers)}, "
                    f"expected {len(allowed)}; sent {sent.get(doc)}; answers {answered[:30]}"
                )
            union = frozenset().union(*allowed) if allowed else frozenset()
            if not set(answers) <= union:
                self.tally.fail(f"{subject} {doc[:40]!r}: answered {set(answers) - union}")
        for doc in probe.notices:
            self.tally.other["rule_violation"] += probe.notices[doc]
            if "mutated update" not in sent.get(doc, []):
                self.tally.fail(f"{subject} {doc[:40]!r}: rule_violation for {sent.get(doc)}")
        for doc, allowed in expected.items():
            if doc not in probe.answers:
                self.tally.fail(f"{subject} {doc[:40]!r}: no answer to {len(allowed)} messages")

    async def short(self, subject: str) -> None:
        """A connection that dies young: before its hello, at its hello, or just after."""
        rng = self.rng
        self.tally.connections["v1 short"] += 1
        pick = rng.random()
        if pick < 0.25:
            await self.v1(subject, rng.randint(0, 4), closing=True)
            return
        if pick < 0.45:
            # Before any hello: only a hello (or an auth) may come first.
            probe = await self.connect(self.server.sync_url, self.tokens[subject])
            first = rng.choice(
                [
                    encode_frame(
                        [encode_body(DocMessage("wo:h1", y_update(b"\x00", SyncStep.STEP1)))]
                    ),
                    encode_frame([encode_body(Control({"type": "changes"}))]),
                    encode_frame([encode_body(Control({"type": "ping"}))]),
                ]
            )
            await probe.send(first)
            self.count("before hello")
            self.closed_as(await probe.closed(), {4400}, "before hello")
            await probe.finish()
            return
        if pick < 0.65:
            frame, category = self.fuzz.odd_hello()
            probe = await self.connect(self.server.sync_url, self.tokens[subject])
            await probe.send(frame)
            self.count(category)
            welcomed = await probe.wait(
                lambda: probe.controls["changes"] > 0 or probe.close is not None
            )
            if not welcomed or probe.close is not None or probe.controls["welcome"] != 1:
                self.tally.fail(f"odd hello {frame[:60]!r}: {probe.controls} close {probe.close}")
            await probe.finish()
            return
        await self.tokens_plan()

    async def tokens_plan(self) -> None:
        """Bad and expired tokens, in the header and in the `hello` (browsers)."""
        rng, issuer = self.rng, self.server.issuer
        good = self.tokens["tina"]
        head, payload, signature = good.split(".")
        nested = base64.urlsafe_b64encode(b"[" * 5000).decode().rstrip("=")
        token = rng.choice(
            [
                self.fuzz.junk_token(),
                f"{head}.{payload}.{signature[:-4]}AAAA",
                f"{head}.{payload[:-2]}.{signature}",
                issuer.issue("tina", ttl=-3600),
                issuer.issue("tina", claims={"aud": "someone-else"}),
                issuer.issue("tina", claims={"exp": None}),
                f"{nested}.e30.",  # a JOSE header nested 5,000 deep
                "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ0aW5hIn0.",
            ]
        )
        expected_reason = {"token_expired", "reauthenticate"}
        self.tally.connections["tokens"] += 1
        if rng.random() < 0.5:
            probe = await self.connect(self.server.sync_url, token)
        else:
            # The browser way: no header, the token in the hello.
            probe = await self.connect(self.server.sync_url, None)
            hello = Control({"type": "hello", "token": token, "client": {"platform": "web"}})
            await probe.send(encode_frame([encode_body(hello)]))
            self.count("bad token in hello")
        close = await probe.closed()
        self.closed_as(close, {4401}, "bad token")
        if close is not None and close[1] not in expected_reason:
            self.tally.fail(f"bad token closed with reason {close[1]!r}")
        await probe.finish()

    async def yws(self, subject: str) -> None:
        """Plain y-websocket: a few frames it tolerates, then one it must close on."""
        rng, fuzz = self.rng, self.fuzz
        self.tally.connections["yws"] += 1
        scope, outside = FUZZERS[subject]["scope"], FUZZERS[subject]["outside"]
        pick = rng.random()
        if subject == "sue":
            scope = [QUIET]  # her others may be moved out of her team by accepted mutations
        if pick < 0.15 or not scope:
            doc_id, token, codes = rng.choice(outside), self.tokens[subject], {4403}
            if rng.random() < 0.3:
                token, codes = fuzz.junk_token(), {4401}
            if rng.random() < 0.5:  # the document id is checked first
                doc_id, codes = rng.choice(["wo:", "x:1", "wo:a b", "wo:" + "z" * 90]), {4400}
            probe = await self.connect(self.server.yws_url(doc_id), token, YwsProbe)
            if codes == {4403} and subject in ("sam", "sue"):
                # To a supervisor, a work order outside the team looks absent (the socket opens,
                # empty): writing into it is what closes it.
                await probe.send(y_update(rng.choice(fuzz.valid_updates)))
            self.closed_as(await probe.closed(), codes, "yws refused")
            await probe.finish()
            return
        doc_id = rng.choice(scope)
        probe = await self.connect(self.server.yws_url(doc_id), self.tokens[subject], YwsProbe)
        try:
            if not await probe.wait(lambda: probe.y_messages > 0 or probe.close is not None):
                self.tally.fail("yws: no greeting")
            steps = 0
            for _ in range(rng.randint(0, 12)):
                if rng.random() < 0.6:
                    await probe.send(fuzz.awareness())
                else:
                    await probe.send(y_update(b"\x00", SyncStep.STEP1))
                    steps += 1
            if not await probe.wait(lambda: probe.received() >= steps or probe.close is not None):
                self.tally.fail(f"yws: {probe.received()} of {steps} step 2 answers")
            if probe.close is not None:
                self.tally.fail(f"yws closed {probe.close} on tolerated input")
                return
            choice = rng.random()
            if choice < 0.3:
                frame: bytes | str = y_update(
                    fuzz.garbage_update(), rng.choice([SyncStep.STEP2, SyncStep.UPDATE])
                )
                codes, category = {4400}, "yws garbage update"
            elif choice < 0.45:
                frame = y_update(fuzz.garbage_state_vector(), SyncStep.STEP1)
                codes, category = {4400}, "yws garbage state vector"
            elif choice < 0.65:
                frame, codes, category = fuzz.undecodable_y(), {4400}, "yws undecodable"
            elif choice < 0.8:
                frame, codes, category = fuzz.garbage_awareness(), {4400}, "yws bad awareness"
            elif choice < 0.9:
                frame, codes, category = "text", {4400}, "yws text frame"
            else:
                frame, codes, category = b"\x00" * (MAX_FRAME + 1), {4413}, "yws oversized"
            await probe.send(frame)
            self.count(category)
            self.closed_as(await probe.closed(), codes, category)
        finally:
            await probe.finish()

    async def silent(self, token: str | None) -> None:
        """Never says hello: closed when the auth timeout runs out."""
        self.tally.connections["silent"] += 1
        probe = await self.connect(self.server.sync_url, token)
        self.closed_as(await probe.closed(AUTH_TIMEOUT + 20), {4408}, "auth timeout")
        await probe.finish()

    async def flood(self) -> None:
        """Well-formed but too many: a control message the server ignores, past the burst."""
        self.tally.connections["flood"] += 1
        probe = await self.connect(self.server.sync_url, self.tokens["tom"])
        await self.hello(probe, "tom")
        noop = encode_frame([encode_body(Control({"type": "noop"}))])
        for _ in range(int(BURST * 4)):
            if probe.close is not None:
                break
            await probe.send(noop)
            self.tally.other["flood frames"] += 1
        self.closed_as(await probe.closed(), {4429}, "flood")
        await probe.finish()

    async def worker(self, deadline: float) -> None:
        subjects = list(FUZZERS)
        while self.tally.total < FRAMES and time.monotonic() < deadline:
            subject = self.rng.choice(subjects)
            pick = self.rng.random()
            if pick < 0.3:
                await self.v1(subject, self.rng.randint(20, 120), closing=self.rng.random() < 0.8)
            elif pick < 0.9:
                await self.short(subject)
            else:
                await self.yws(subject)


# --- the healthy devices ---------------------------------------------------------------------


class Device:
    """A `fieldsync.client.Client` editing real work orders, one marker per edit."""

    def __init__(self, name: str, client: Client, docs: list[str]) -> None:
        self.name = name
        self.client = client
        self.docs = docs
        self.markers: dict[str, list[str]] = defaultdict(list)
        self.edits = 0

    def edit(self, rng: random.Random) -> None:
        doc_id = rng.choice(self.docs)
        doc = self.client.docs[doc_id]
        marker = f"[{self.name}{self.edits}]"
        self.edits += 1
        self.markers[doc_id].append(marker)
        if rng.random() < 0.7:
            notes = doc.get("notes", type=Text)
            notes.insert(len(str(notes)), marker)
        else:
            entries = doc.get("time_entries", type=Array)
            entries.append(Map({"by": self.name, "marker": marker, "minutes": rng.randint(1, 90)}))

    async def keep_editing(self, rng: random.Random, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.edit(rng)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), rng.uniform(0.02, 0.12))


async def stored_json(server: Server, doc_id: str) -> dict[str, Any]:
    return documents.to_json(doc_id, await stored_doc(server, doc_id))


async def health(server: Server, http: aiohttp.ClientSession, stop: asyncio.Event) -> list[float]:
    latencies = []
    while not stop.is_set():
        start = time.monotonic()
        async with http.get(server.url + "/v1/health") as response:
            assert response.status == 200, response.status
            assert (await response.json())["status"] == "ok"
        latencies.append(time.monotonic() - start)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)
    return latencies


# --- the test ---------------------------------------------------------------------------------


@pytest.mark.slow
async def test_malformed_input_gets_its_answer_and_loses_nothing(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    started = time.monotonic()
    rng = random.Random(SEED)

    # The healthy world: a supervisor creates three work orders, two technicians work on them.
    sam = server.client("sam")
    tina = server.client("tina")
    tom = server.client("tom")
    sue = server.client("sue")
    devices = [
        Device("sam", sam, list(HEALTHY)),
        Device("tina", tina, ["wo:h1", "wo:h3"]),
        Device("tom", tom, ["wo:h2"]),
    ]
    own: dict[str, Doc[Any]] = {}
    try:
        for client in (sam, tina, tom, sue):
            await client.start()
        for doc_id, assignee in HEALTHY.items():
            sam.doc(doc_id).apply_update(work_order(doc_id, assignee=assignee).get_update())
        for doc_id in (*OWN, QUIET):
            seed = work_order(doc_id, assignee=None, team="south", region="west")
            sue.doc(doc_id).apply_update(seed.get_update())
            own[doc_id] = seed
        await sam.wait_acked()
        await sue.wait_acked()
        await sue.close()
        for device in devices[1:]:
            for doc_id in device.docs:
                await device.client.wait_synced(doc_id)

        stop = asyncio.Event()
        editors = [
            asyncio.create_task(device.keep_editing(random.Random(rng.random()), stop))
            for device in devices
        ]
        async with aiohttp.ClientSession() as http:
            pinger = asyncio.create_task(health(server, http, stop))
            tokens = {subject: server.token(subject) for subject in (*FUZZERS, "tom")}
            campaign = Campaign(server, http, Fuzz(SEED, own, tokens))
            specials = [
                campaign.silent(server.token("tom")),
                campaign.silent(None),
                campaign.flood(),
                *(campaign.tokens_plan() for _ in range(8)),
            ]
            deadline = time.monotonic() + 75
            await asyncio.gather(*specials, *(campaign.worker(deadline) for _ in range(WORKERS)))
            fuzz_seconds = time.monotonic() - started
            stop.set()
            await asyncio.gather(*editors)
            latencies = await pinger

            # The devices converge: every edit acked, the same content as the server stored.
            for device in devices:
                await device.client.wait_acked(timeout=30)
            for doc_id in HEALTHY:
                stored = await stored_json(server, doc_id)
                holders = [d for d in devices if doc_id in d.docs]
                await eventually(
                    lambda doc_id=doc_id, holders=holders, stored=stored: all(
                        documents.to_json(doc_id, d.client.docs[doc_id]) == stored for d in holders
                    ),
                    timeout=20,
                )
                text = stored["notes"] + orjson.dumps(stored["time_entries"]).decode()
                for device in holders:
                    missing = [m for m in device.markers[doc_id] if m not in text]
                    assert not missing, f"{device.name} lost {missing} of {doc_id}"
            async with http.get(server.url + "/v1/health") as response:
                assert response.status == 200
        pending = {device.name: device.client.pending() for device in devices}
    finally:
        for client in (sam, tina, tom):
            await client.close()

    tally = campaign.tally
    report = summary(tally, fuzz_seconds, latencies, devices)
    print(report)
    for device in devices:
        assert device.client.errors == [], (device.name, device.client.errors[:5])
        assert device.client.resets == [], (device.name, device.client.resets[:5])
        assert device.client.fatal is None, device.name
    assert pending == {"sam": 0, "tina": 0, "tom": 0}, pending
    assert not tally.failures, "\n".join(tally.failures) + "\n" + report
    assert tally.total >= FRAMES, report
    server_log = [
        f"{r.name} {r.levelname}: {r.getMessage()[:200]}"
        for r in caplog.records
        if r.levelno >= logging.WARNING
    ]
    assert not server_log, "\n".join(server_log[:20])
    # Every documented per-connection answer was reached, and no other.
    codes = {int(key.split()[0]) for key in tally.closes}
    assert codes <= {4400, 4401, 4403, 4408, 4413, 4429}, tally.closes
    assert codes >= {4400, 4401, 4403, 4408, 4413, 4429}, tally.closes
    assert {"invalid_update", "invalid_doc_id", "forbidden", ACK, STEP2} <= set(tally.answers)


def summary(tally: Tally, seconds: float, latencies: list[float], devices: list[Device]) -> str:
    lines = [
        f"seed {SEED}: {tally.total} malformed frames ({tally.messages} messages) in "
        f"{seconds:.1f} s over {sum(tally.connections.values())} connections "
        f"{dict(tally.connections)}",
        "frames: " + ", ".join(f"{k} {v}" for k, v in tally.frames.most_common()),
        "closes: " + ", ".join(f"{k} x{v}" for k, v in tally.closes.most_common()),
        "answers: " + ", ".join(f"{k} {v}" for k, v in tally.answers.most_common()),
        "other: " + ", ".join(f"{k} {v}" for k, v in tally.other.most_common()),
        f"health: {len(latencies)} checks, max {max(latencies, default=0) * 1000:.0f} ms",
        "healthy edits: " + ", ".join(f"{d.name} {d.edits}" for d in devices),
    ]
    return "\n".join(lines)


# --- regressions: inputs the fuzzing found ------------------------------------------------------

# A work order written by Yjs client 1 (team north, assignee tina, notes "notes"), and two edits
# of it mutated by a few bytes. pycrdt 0.14.13 takes part of the first before raising
# RuntimeError ("block parent must be deleted or shared ref type"): its notes read "nohellotes"
# in memory, which nobody stored. The second makes it panic.
BASE = bytes.fromhex(
    "010c01002801066669656c6473066e756d626572017701782801066669656c6473057469746c6501770174"
    "2801066669656c64730861737369676e656501770474696e612801066669656c6473047465616d0177056e"
    "6f7274682801066669656c647306726567696f6e017704656173742801066669656c647306737461747573"
    "01770861737369676e6564070109636865636b6c6973740128000106026964017702633128000106056c61"
    "62656c017705436865636b2800010608726571756972656401782800010604646f6e6501790401056e6f74"
    "6573056e6f74657300"
)
BREAKS_MID_APPLY = {
    "partial": "01040200c4010c010d0568656c6c6f87010601280002030269640177026332a80105017704646f1365"
    "0101010501",
    "panic": "0100010c010d0568656c6c87010601280002050269640177026332a80105017704646f6e650101010501",
}


@pytest.mark.parametrize("case", list(BREAKS_MID_APPLY))
async def test_an_update_that_breaks_pycrdt_mid_apply_leaves_no_split_room(
    server: Server, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    """An update that breaks pycrdt part way through (or panics it) is refused and undone: the
    room's document is rebuilt as it was before it, so memory, storage and every replica agree,
    and the other replica needs no resync."""
    caplog.set_level(logging.WARNING)
    async with connect(server.sync_url, server.token("sam")) as sam:
        await sam.hello()
        await sam.update("wo:mid", BASE)
        await sam.control("ack", doc="wo:mid")
        async with connect(server.sync_url, server.token("tina")) as tina:
            await tina.hello()
            await tina.step1("wo:mid")
            await tina.doc_message("wo:mid", SyncStep.STEP2)

            await sam.update("wo:mid", bytes.fromhex(BREAKS_MID_APPLY[case]))
            error = await sam.control("error", doc="wo:mid")
            assert error["code"] == "invalid_update"

            async with connect(server.sync_url, server.token("sam")) as late:
                await late.hello()
                await late.step1("wo:mid")
                doc: Doc[Any] = Doc()
                doc.apply_update(await late.doc_message("wo:mid", SyncStep.STEP2))
                served = documents.to_json("wo:mid", doc)
                assert served == await stored_json(server, "wo:mid")
                assert served["notes"] == "notes"

                # Live edits reach every replica again: one room per document.
                await tina.step1("wo:mid")
                await tina.doc_message("wo:mid", SyncStep.STEP2)
                edit: Doc[Any] = Doc()
                edit.apply_update(BASE)
                before = edit.get_state()
                edit.get("notes", type=Text).insert(5, " checked")
                await tina.update("wo:mid", edit.get_update(before))
                await tina.control("ack", doc="wo:mid")
                doc.apply_update(await late.doc_message("wo:mid", SyncStep.UPDATE))
                assert str(doc.get("notes", type=Text)) == "notes checked"
            assert [c for c in tina.controls if c["type"] in ("reset", "error")] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def peak_rss() -> int:
    """This process's peak resident memory (bytes): the server runs in it."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


async def test_counts_past_the_bytes_cost_nothing(server: Server) -> None:
    """Eight bytes claiming 2^29 entries: pycrdt would reserve a gigabyte (and most of a second)
    for them before reading one. They are refused first, as an invalid update."""
    huge = write_varuint((1 << 29) - 1) + b"\x01\x01"
    peak = peak_rss()
    started = time.monotonic()
    async with connect(server.sync_url, server.token("sam")) as sam:
        await sam.hello()
        await sam.update("wo:c1", work_order("wo:c1", team="north").get_update())
        await sam.control("ack", doc="wo:c1")
        for _ in range(3):
            await sam.step1("wo:c1", huge)
            assert (await sam.control("error", doc="wo:c1"))["code"] == "invalid_update"
            await sam.update("wo:c1", huge)
            assert (await sam.control("error", doc="wo:c1"))["code"] == "invalid_update"
            await sam.update("wo:c2", huge)  # a creation: read on a scratch copy first
            assert (await sam.control("error", doc="wo:c2"))["code"] == "invalid_update"
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {server.token('sam')}"}
        async with http.ws_connect(server.yws_url("wo:c1"), headers=headers) as ws:
            await ws.receive()  # the server's step 1
            await ws.send_bytes(y_update(huge, SyncStep.STEP1))
            assert (await ws.receive()).type is aiohttp.WSMsgType.CLOSE
            assert ws.close_code == CloseCode.PROTOCOL_ERROR
    assert peak_rss() - peak < 100 << 20, (peak_rss() - peak) >> 20
    assert time.monotonic() - started < 5
