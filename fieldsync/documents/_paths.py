"""What an update writes, as paths a policy can name: a root ("checklist", "notes") or, for a
root map, one of its keys ("fields.status")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pycrdt import Doc, Map


def paths_written(doc: Doc, roots: dict[str, Any], update: bytes) -> set[str]:
    """Apply `update` to `doc` (a scratch replica) and return the paths it changed. A root
    outside the document's schema is returned as its name, so a policy refuses it."""
    paths: set[str] = set()
    known_before = set(doc.keys())
    observed = []
    for name, kind in roots.items():
        root = doc.get(name, type=kind)
        observed.append((root, root.observe_deep(_collector(name, kind is Map, paths))))
    try:
        doc.apply_update(update)
    finally:
        for root, subscription in observed:
            root.unobserve(subscription)
    paths.update(set(doc.keys()) - set(roots) - known_before)
    return paths


def _collector(name: str, keyed: bool, paths: set[str]) -> Callable[[list[Any]], None]:
    def collect(events: list[Any]) -> None:
        for event in events:
            if not keyed:
                paths.add(name)
            elif event.path:
                paths.add(f"{name}.{event.path[0]}")
            else:
                paths.update(f"{name}.{key}" for key in event.keys)

    return collect
