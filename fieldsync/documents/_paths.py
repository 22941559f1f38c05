"""What an update changes, as paths with old and new values: "fields.status" (a key of a root
map), "checklist.2.done" (a key of a map inside a root array), "notes" (a root text or array,
with its delta). Policies name the same paths; field history records them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from pycrdt import Array, Doc, Map, Subscription

from fieldsync.storage import FieldChange


def watch(doc: Doc, roots: dict[str, Any], sink: list[FieldChange]) -> Callable[[], None]:
    """Record into `sink` every change made to `doc`'s schema roots from now on; returns the
    function that stops recording."""
    observed: list[tuple[Any, Subscription]] = []
    for name, kind in roots.items():
        root = doc.get(name, type=kind)
        observed.append((root, root.observe_deep(_collector(name, kind is Map, sink))))

    def stop() -> None:
        for root, subscription in observed:
            root.unobserve(subscription)

    return stop


class Scratch:
    """A replica kept beside a document, to read what an update writes before the document
    takes it. It watches its roots for its whole life: subscribing per check would cost more
    than the check."""

    def __init__(self, state: bytes, roots: dict[str, Any]) -> None:
        self.doc: Doc = Doc()
        self.doc.apply_update(state)
        self._roots = roots
        self._changes: list[FieldChange] = []
        self._unwatch = watch(self.doc, roots, self._changes)

    def apply(self, update: bytes) -> None:
        self.doc.apply_update(update)
        self._changes.clear()

    def written(self, update: bytes) -> list[FieldChange]:
        """Apply `update` and return what it changed. A root outside the document's schema
        comes back as a change of its name, so a policy refuses it."""
        doc, roots = self.doc, self._roots
        known_before = set(doc.keys())
        # A root outside the schema that the document holds already (a creation, or a role that
        # writes everything, put it there): a write into it is that root's name too. Its type
        # is unknown; any view observes it, and one without keys reports any change as the root.
        outside: list[FieldChange] = []
        stop_outside = (
            watch(doc, dict.fromkeys(known_before - set(roots), Array), outside)
            if known_before - set(roots)
            else None
        )
        self._changes.clear()
        try:
            doc.apply_update(update)
        finally:
            if stop_outside is not None:
                stop_outside()
        changes = self._changes[:]
        self._changes.clear()
        new_roots = set(doc.keys()) - set(roots) - known_before
        paths = {change.path.split(".", 1)[0] for change in outside} | new_roots
        return changes + [FieldChange(path, None, None) for path in sorted(paths)]


def data(root: Map | Array) -> Any:
    """A map's or array's content as plain data, read in one call (pycrdt's `to_py` walks it
    item by item, about 18 times slower on a list of maps)."""
    return orjson.loads(str(root))


def plain(value: Any) -> Any:
    """A value as JSON-ready data (nested shared types become dicts and lists)."""
    if isinstance(value, list):
        return [plain(item) for item in value]
    to_py = getattr(value, "to_py", None)
    return to_py() if callable(to_py) else value


def _collector(name: str, keyed: bool, sink: list[FieldChange]) -> Callable[[list[Any]], None]:
    def collect(events: list[Any]) -> None:
        for event in events:
            where = ".".join([name, *(str(step) for step in event.path)])
            keys = getattr(event, "keys", None)
            if keys is not None and (keyed or event.path):
                for key, change in keys.items():
                    sink.append(
                        FieldChange(
                            f"{where}.{key}",
                            plain(change.get("oldValue")),
                            plain(change.get("newValue")),
                        )
                    )
            else:
                delta = [
                    {op: plain(value) for op, value in step.items()}
                    for step in getattr(event, "delta", [])
                ]
                sink.append(FieldChange(where, None, delta))

    return collect
