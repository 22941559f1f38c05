"""Awareness (presence, cursors) of one room: relayed, kept in memory for late joiners, never
stored; a replica that leaves without saying so is announced gone (y-protocols awareness.js).

A Yjs client id's state belongs to the replica (connection) that announced it first, until that
replica clears it or leaves: no other replica may change or clear it. Stock Yjs providers echo
every state they receive, so another replica's entry is dropped, not an error.
"""

from __future__ import annotations

from collections import Counter
from typing import Generic, TypeVar

import orjson

from fieldsync.errors import ProtocolError
from fieldsync.replication._codec import Reader, encode_awareness, write_varstring, write_varuint

Owner = TypeVar("Owner")
Entry = tuple[int, int, str]  # client id, clock, JSON state ('null': the client is gone)

MAX_STATES = 1_000  # per room: presence is for people looking at a work order, not a crowd
# Per replica and room: a Yjs provider announces one client id per document; a few more leave
# room for a client whose Yjs doc changed its id, none for one replica filling the room.
MAX_STATES_PER_REPLICA = 4
MAX_STATE_BYTES = 4_096  # a name, a colour, a cursor: not a place to park data


def decode_update(payload: bytes) -> list[Entry]:
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


def encode_update(entries: list[Entry]) -> bytes:
    parts = [write_varuint(len(entries))]
    for client, clock, state in entries:
        parts += [write_varuint(client), write_varuint(clock), write_varstring(state)]
    return encode_awareness(b"".join(parts))


class Awareness(Generic[Owner]):
    def __init__(self) -> None:
        self._states: dict[int, tuple[int, str]] = {}
        self._owners: dict[int, Owner] = {}
        self._owned: Counter[Owner] = Counter()
        # What replicas waiting for the document to exist announced meanwhile: their latest
        # state per client id, applied once they are admitted.
        self._held: dict[Owner, dict[int, tuple[int, str]]] = {}

    def apply(self, owner: Owner, payload: bytes) -> bytes | None:
        """Record what `owner` sent; returns the awareness message of what it changed, for the
        other replicas (None: nothing), so what it may not change is not relayed either.
        Raises `ProtocolError` for a malformed update."""
        return self._accept(owner, decode_update(payload))

    def hold(self, owner: Owner, payload: bytes) -> None:
        """Keep what a replica still waiting for the document announced (every Yjs provider
        announces itself on connecting), for `release` once it is admitted. Raises
        `ProtocolError` for a malformed update."""
        held = self._held.setdefault(owner, {})
        for client, clock, state in decode_update(payload):
            if client in held or len(held) < MAX_STATES_PER_REPLICA:
                held[client] = (clock, state)

    def release(self, owner: Owner) -> bytes | None:
        """Apply what `owner` announced while it waited; the message for the other replicas."""
        held = self._held.pop(owner, None)
        if not held:
            return None
        return self._accept(owner, [(client, clock, s) for client, (clock, s) in held.items()])

    def _accept(self, owner: Owner, entries: list[Entry]) -> bytes | None:
        accepted = []
        for client, clock, state in entries:
            holder = self._owners.get(client)
            if holder is not None and holder is not owner:
                continue  # another replica's: an echo, or a spoof
            known = self._states.get(client)
            if known is not None and clock < known[0]:
                continue
            if state == "null":
                if holder is None:
                    continue  # nothing to clear
                del self._states[client]
                self._disown(client)
            elif holder is None:
                if len(self._states) >= MAX_STATES or self._owned[owner] >= MAX_STATES_PER_REPLICA:
                    continue
                self._states[client] = (clock, state)
                self._owners[client] = owner
                self._owned[owner] += 1
            else:
                self._states[client] = (clock, state)
            accepted.append((client, clock, state))
        return encode_update(accepted) if accepted else None

    def _disown(self, client: int) -> None:
        owner = self._owners.pop(client)
        self._owned[owner] -= 1
        if self._owned[owner] <= 0:
            del self._owned[owner]

    def snapshot(self) -> bytes | None:
        """Every known state, as one awareness message for a replica that just joined."""
        if not self._states:
            return None
        return encode_update([(c, clock, s) for c, (clock, s) in self._states.items()])

    def leave(self, owner: Owner) -> bytes | None:
        """Forget `owner`'s states; the message that tells the others they are gone."""
        self._held.pop(owner, None)
        gone = [client for client, holder in self._owners.items() if holder is owner]
        entries = []
        for client in gone:
            clock, _ = self._states.pop(client)
            self._disown(client)
            entries.append((client, clock + 1, "null"))
        return encode_update(entries) if entries else None
