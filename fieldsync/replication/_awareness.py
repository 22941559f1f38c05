"""Awareness (presence, cursors) of one room: relayed, kept in memory for late joiners, never
stored; a replica that leaves without saying so is announced gone (y-protocols awareness.js)."""

from __future__ import annotations

from typing import Generic, TypeVar

import orjson

from fieldsync.errors import ProtocolError
from fieldsync.replication._codec import Reader, encode_awareness, write_varstring, write_varuint

Owner = TypeVar("Owner")

MAX_STATES = 1_000  # per room: presence is for people looking at a work order, not a crowd
MAX_STATE_BYTES = 4_096  # a name, a colour, a cursor: not a place to park data


def decode_update(payload: bytes) -> list[tuple[int, int, str]]:
    """An awareness update: (client id, clock, JSON state or 'null') entries."""
    reader = Reader(payload)
    count = reader.varuint()
    if count > reader.remaining:
        raise ProtocolError("awareness update longer than its bytes")
    entries = [(reader.varuint(), reader.varuint(), reader.varstring()) for _ in range(count)]
    if reader.remaining:
        raise ProtocolError("bytes after the awareness update")
    for _, _, state in entries:
        if len(state) > MAX_STATE_BYTES:
            raise ProtocolError(f"awareness state over {MAX_STATE_BYTES} bytes")
        try:
            orjson.loads(state)  # relayed to Yjs clients, which parse it
        except orjson.JSONDecodeError:
            raise ProtocolError("awareness state is not JSON") from None
    return entries


def encode_update(entries: list[tuple[int, int, str]]) -> bytes:
    parts = [write_varuint(len(entries))]
    for client, clock, state in entries:
        parts += [write_varuint(client), write_varuint(clock), write_varstring(state)]
    return encode_awareness(b"".join(parts))


class Awareness(Generic[Owner]):
    def __init__(self) -> None:
        self._states: dict[int, tuple[int, str]] = {}
        self._owners: dict[int, Owner] = {}

    def apply(self, owner: Owner, payload: bytes) -> None:
        """Record what `owner` sent; raises `ProtocolError` for a malformed update. Yjs
        providers echo the states they receive, so a client id belongs to the replica that
        announced it first."""
        for client, clock, state in decode_update(payload):
            known = self._states.get(client)
            if known is not None and clock < known[0]:
                continue
            if state == "null":
                self._states.pop(client, None)
                self._owners.pop(client, None)
            elif known is not None or len(self._states) < MAX_STATES:
                self._states[client] = (clock, state)
                self._owners.setdefault(client, owner)

    def snapshot(self) -> bytes | None:
        """Every known state, as one awareness message for a replica that just joined."""
        if not self._states:
            return None
        return encode_update([(c, clock, s) for c, (clock, s) in self._states.items()])

    def leave(self, owner: Owner) -> bytes | None:
        """Forget `owner`'s states; the message that tells the others they are gone."""
        gone = [client for client, holder in self._owners.items() if holder is owner]
        entries = []
        for client in gone:
            clock, _ = self._states.pop(client)
            del self._owners[client]
            entries.append((client, clock + 1, "null"))
        return encode_update(entries) if entries else None
