"""The outbox for operators (admins): list its entries (dead letters first of all, with the
error and the entity each failed on), deliver one again or skip it. The CLI's `fieldsync outbox`
does the same on the database directly."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from fieldsync.api._http import json_response, rest
from fieldsync.api._paging import Cursors, page_size
from fieldsync.api._permissions import PRINCIPAL
from fieldsync.errors import ErrorCode, FieldsyncError
from fieldsync.storage import Outbox, OutboxEntry, OutboxState

__all__ = ["OutboxRoutes", "entry_json"]

_MAX_FILTER = 200  # characters of an adapter name or a document id filter


def entry_json(entry: OutboxEntry) -> dict[str, Any]:
    """An entry as operators read it (REST and `fieldsync outbox list --json`)."""
    error = entry.error
    return {
        "id": entry.id,
        "adapter": entry.adapter,
        "doc": entry.doc,
        "seq": entry.seq,
        "state": entry.state.value,
        "attempts": entry.attempts,
        "error": (
            {"code": error.code, "message": error.message, "entity": error.entity}
            if error
            else None
        ),
        "created_at": entry.created_at,
        "updated_at": entry.updated_at,
        "next_at": entry.next_at,
    }


class OutboxRoutes:
    """`changed` is called after an operator's action, so the runner acts on it now."""

    def __init__(
        self,
        outbox: Outbox,
        cursor_key: Callable[[], Awaitable[bytes]],
        changed: Callable[[], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._outbox = outbox
        self._cursors = Cursors(cursor_key)
        self._changed = changed
        self._clock = clock

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/admin/outbox", rest(self.list)),
            web.post("/v1/admin/outbox/{entry_id}/retry", rest(self.retry)),
            web.post("/v1/admin/outbox/{entry_id}/skip", rest(self.skip)),
        ]

    async def list(self, request: web.Request) -> web.StreamResponse:
        """Entries by id, oldest first, filtered by `adapter`, `state` and `doc`."""
        adapter = _filter(request, "adapter")
        doc = _filter(request, "doc")
        raw_state = _filter(request, "state")
        try:
            state = OutboxState(raw_state) if raw_state is not None else None
        except ValueError:
            states = ", ".join(s.value for s in OutboxState)
            raise FieldsyncError(
                ErrorCode.INVALID_REQUEST, f"state must be one of {states}"
            ) from None
        binding = ("outbox", request[PRINCIPAL].subject, adapter, raw_state, doc)
        after = await self._cursors.read(request, binding, 1)
        limit = page_size(request)
        entries = await self._outbox.entries(
            adapter=adapter,
            state=state,
            doc=doc,
            after_id=int(after[0]) if after else None,
            limit=limit + 1,
        )
        page = entries[:limit]
        next_cursor = (
            await self._cursors.make(binding, (str(page[-1].id),)) if len(entries) > limit else None
        )
        return await json_response(
            request, {"items": [entry_json(e) for e in page], "next": next_cursor}
        )

    async def retry(self, request: web.Request) -> web.StreamResponse:
        """Deliver the entry again now, with the dead entries of its document and adapter."""
        entry = await self._outbox.retry(_entry_id(request), self._clock())
        return await self._answer(request, entry)

    async def skip(self, request: web.Request) -> web.StreamResponse:
        """Never deliver the entry (nor the earlier undelivered ones of its document)."""
        entry = await self._outbox.skip(_entry_id(request), self._clock())
        return await self._answer(request, entry)

    async def _answer(self, request: web.Request, entry: OutboxEntry | None) -> web.Response:
        if entry is None:
            raise FieldsyncError(
                ErrorCode.NOT_FOUND, f"no outbox entry {request.match_info['entry_id'][:40]}"
            )
        self._changed()
        return await json_response(request, entry_json(entry))


def _filter(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    if value is not None and (not value or len(value) > _MAX_FILTER):
        raise FieldsyncError(
            ErrorCode.INVALID_REQUEST, f"{name} must be 1 to {_MAX_FILTER} characters"
        )
    return value


def _entry_id(request: web.Request) -> int:
    raw = request.match_info["entry_id"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise FieldsyncError(ErrorCode.NOT_FOUND, f"no outbox entry {raw[:40]}")
    return int(raw)
