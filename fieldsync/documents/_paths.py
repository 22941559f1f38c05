"""What an update changes, as paths with old and new values: "fields.status" (a key of a root
map), "checklist.2.done" (a key of a map inside a root array), "notes" (a root text or array,
with its delta). Policies name the same paths; field history records them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from pycrdt import Array, Doc, Map
from pycrdt import _base as _pycrdt_base

from fieldsync.records import FieldChange

# What pycrdt's `observe_deep` does to each value of an event, for the lean subscription below
# (None should pycrdt's internals change: the public API serves then).
_process_event: Callable[[Any, Doc[Any]], Any] | None = getattr(_pycrdt_base, "process_event", None)

Wrap = Callable[[Any], Any]  # a value as an event holds it -> as pycrdt's public types


def watch(
    doc: Doc[Any], roots: dict[str, Any], sink: list[FieldChange], *, lean: bool = True
) -> Callable[[], None]:
    """Record into `sink` every change made to `doc`'s schema roots from now on; returns the
    function that stops recording. `lean=False`: through pycrdt's public `observe_deep` only
    (the tests compare both)."""
    stops = []
    for name, kind in roots.items():
        root = doc.get(name, type=kind)
        stops.append(_observe_deep(doc, root, name, kind is Map, sink, lean))

    def stop() -> None:
        for stop_one in stops:
            stop_one()

    return stop


def _observe_deep(
    doc: Doc[Any], root: Any, name: str, keyed: bool, sink: list[FieldChange], lean: bool
) -> Callable[[], None]:
    """Deep-observe `root`. pycrdt's `observe_deep` builds every attribute of every event (a
    wrapper of its target too) before the callback runs: most of what the scratch replica's
    read of an update costs (~25 µs, against ~5 µs for the apply alone). The native
    subscription, with the read transaction pycrdt opens around the callback, lets the
    collector read only the path and the changed keys or delta, converting just the values it
    records. Falls back to `observe_deep` should pycrdt's internals change."""
    native = getattr(getattr(root, "integrated", None), "observe_deep", None)
    internals = hasattr(doc, "_read_transaction") and hasattr(doc, "_exceptions")
    if not lean or native is None or _process_event is None or not internals:
        collect = _collector(name, keyed, sink, lambda value: value)
        subscription = root.observe_deep(collect)
        return lambda: root.unobserve(subscription)
    process = _process_event
    collect = _collector(name, keyed, sink, lambda value: process(value, doc))

    def callback(events: list[Any]) -> None:
        try:
            with doc._read_transaction(events[0].transaction):
                collect(events)
        except Exception as exc:  # for pycrdt to raise when the transaction ends, as it does
            doc._exceptions.append(exc)

    subscription = native(callback)
    drop: Callable[[], None] = subscription.drop
    return drop


class Watched:
    """A document watched for what each update writes to it, as paths. It watches its roots for
    its whole life: subscribing per update would cost more than the reading."""

    def __init__(self, doc: Doc[Any], roots: dict[str, Any]) -> None:
        self.doc = doc
        self._roots = roots
        self._changes: list[FieldChange] = []
        self._unwatch = watch(doc, roots, self._changes)
        self._known = root_names(doc)  # the roots the document holds, kept current

    @classmethod
    def replica(cls, state: bytes, roots: dict[str, Any]) -> Watched:
        """A new document at `state`, watched."""
        doc: Doc[Any] = Doc()
        doc.apply_update(state)
        return cls(doc, roots)

    def changed(self) -> list[FieldChange]:
        """What the document's own transactions changed since the last call (a rule's
        correction made on the document directly)."""
        changes = self._changes[:]
        self._changes.clear()
        self._known = root_names(self.doc)
        return changes

    def written(self, update: bytes) -> list[FieldChange]:
        """Apply `update` and return what it changed. A root outside the document's schema
        comes back as a change of its name, so a policy refuses it."""
        doc, schema, known_before = self.doc, set(self._roots), self._known
        # A root outside the schema that the document holds already (a creation, or a role that
        # writes everything, put it there): a write into it is that root's name too. Its type
        # is unknown; any view observes it, and one without keys reports any change as the root.
        outside: list[FieldChange] = []
        stop_outside = (
            watch(doc, dict.fromkeys(known_before - schema, Array), outside)
            if known_before - schema
            else None
        )
        self._changes.clear()
        try:
            doc.apply_update(update)
        finally:
            if stop_outside is not None:
                stop_outside()
            self._known = root_names(doc)
        changes = self._changes[:]
        self._changes.clear()
        new_roots = self._known - schema - known_before
        paths = {change.path.split(".", 1)[0] for change in outside} | new_roots
        return changes + [FieldChange(path, None, None) for path in sorted(paths)]


def root_names(doc: Doc[Any]) -> set[str]:
    """The names of `doc`'s roots. pycrdt's `Doc.keys()` builds a Python view of every root to
    return their names (~40 µs for a work order's, a third of the server's time per update in
    the S1 benchmark); the native document lists the names alone in a few µs. Falls back to
    `keys()` should pycrdt's internals change (tests/documents/test_paths.py compares both)."""
    try:
        with doc.transaction() as txn:
            if txn._txn is not None:
                return set(doc._doc.roots(txn._txn))
    except AttributeError:
        pass
    return set(doc.keys())


def follow(content: list[Any], delta: list[dict[str, Any]]) -> None:
    """Bring `content`, an array root's plain data, up to date with one of its recorded changes
    (the `delta` of a change whose path is the root): cheaper than reading the array again."""
    at = 0
    for step in delta:
        if "retain" in step:
            at += step["retain"]
        elif "insert" in step:
            content[at:at] = step["insert"]
            at += len(step["insert"])
        elif "delete" in step:
            del content[at : at + step["delete"]]


def data(root: Map[Any] | Array[Any]) -> Any:
    """A map's or array's content as plain data, read in one call (pycrdt's `to_py` walks it
    item by item, about 18 times slower on a list of maps)."""
    return orjson.loads(str(root))


def plain(value: Any) -> Any:
    """A value as JSON-ready data (nested shared types become dicts and lists)."""
    if isinstance(value, list):
        return [plain(item) for item in value]
    to_py = getattr(value, "to_py", None)
    return to_py() if callable(to_py) else value


def _collector(
    name: str, keyed: bool, sink: list[FieldChange], wrap: Wrap
) -> Callable[[list[Any]], None]:
    def collect(events: list[Any]) -> None:
        for event in events:
            path = event.path
            where = ".".join([name, *(str(step) for step in path)]) if path else name
            keys = getattr(event, "keys", None)
            if keys is not None and (keyed or path):
                for key, change in keys.items():
                    sink.append(
                        FieldChange(
                            f"{where}.{key}",
                            plain(wrap(change.get("oldValue"))),
                            plain(wrap(change.get("newValue"))),
                        )
                    )
            else:
                delta = [
                    {op: plain(wrap(value)) for op, value in step.items()}
                    for step in getattr(event, "delta", [])
                ]
                sink.append(FieldChange(where, None, delta))

    return collect
