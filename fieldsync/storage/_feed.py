"""What a node learns from the change feed about commits other nodes made (`Documents.follow`):
the scope index of every changed document, and each work order created or moved to another
scope, with its scope before and after. Both backends run the same queries (written here once,
in PostgreSQL's parameter style) and build the page with `build`."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import fields
from typing import Any

from fieldsync.records import DocIndex
from fieldsync.storage._types import ChangesPage, FeedPage, ScopeChange

_COLUMNS = ", ".join(f"w.{f.name}" for f in fields(DocIndex))

# The work order row of every document changed in the range (its own for a work order).
CHANGED = f"""
    SELECT DISTINCT {_COLUMNS} FROM doc_index d JOIN doc_index w ON w.doc = d.wo
    WHERE d.seq > %(since)s AND d.seq <= %(upto)s
"""
# Each scope move (`scope_history` keeps the scope a work order left) and each creation.
_MOVES = """
    SELECT seq, doc, assignee, team, region, 0 AS created FROM scope_history
    WHERE seq > %(since)s AND seq <= %(upto)s
    UNION ALL
    SELECT created_seq, doc, NULL, NULL, NULL, 1 FROM doc_index
    WHERE type = 'wo' AND created_seq > %(since)s AND created_seq <= %(upto)s
"""
MOVES = _MOVES + " ORDER BY 1, 2"
# What the scope was after each move: the scope the next move of that work order left, or the
# row as it stands. So the later moves (beyond `upto` too), the rows now, and the forms.
LATER = """
    SELECT seq, doc, assignee, team, region FROM scope_history
    WHERE seq > %(since)s ORDER BY doc, seq
"""
CURRENT = f"""
    SELECT {_COLUMNS} FROM doc_index w WHERE w.doc IN (SELECT doc FROM ({_MOVES}) m)
"""
FORMS = f"""
    SELECT wo, doc FROM doc_index
    WHERE type = 'form' AND wo IN (SELECT doc FROM ({_MOVES}) m) ORDER BY wo, doc
"""


def sqlite(sql: str) -> str:
    """A query of this module in SQLite's parameter style."""
    return re.sub(r"%\((\w+)\)s", r":\1", sql)


def build(
    page: ChangesPage,
    changed: Iterable[Sequence[Any]],
    moves: Iterable[Sequence[Any]],
    later: Iterable[Sequence[Any]],
    current: Iterable[Sequence[Any]],
    forms: Iterable[Sequence[Any]],
) -> FeedPage:
    """The page for `page`'s range from the rows of the queries above, read in one snapshot."""
    # Moves are told by their scope columns alone: that is all `scope_history` keeps.
    now = {row[0]: DocIndex(*row[:6]) for row in current}
    afterwards: dict[str, list[tuple[int, DocIndex]]] = {}
    for seq, doc, assignee, team, region in later:
        left = DocIndex(doc, "wo", doc, assignee, team, region)
        afterwards.setdefault(doc, []).append((seq, left))
    form_ids: dict[str, list[str]] = {}
    for wo, doc in forms:
        form_ids.setdefault(wo, []).append(doc)
    scope_changes = []
    for seq, doc, assignee, team, region, created in moves:
        if doc not in now:
            continue  # never the case while documents are never deleted
        before = None if created else DocIndex(doc, "wo", doc, assignee, team, region)
        after = next((left for at, left in afterwards.get(doc, ()) if at > seq), now[doc])
        change = ScopeChange(doc, before, after, tuple(form_ids.get(doc, ())))
        scope_changes.append((seq, change))
    return FeedPage(
        page.since, page.upto, [DocIndex(*row) for row in changed], scope_changes, page.more
    )
