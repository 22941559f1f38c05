"""Audit screens: a work order's field history ("who changed the due date, and when") and the
conflicts the domain rules resolved, for supervisors, regional managers and admins."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from fieldsync.api._http import json_response, rest
from fieldsync.api._paging import Cursors, page_size
from fieldsync.api._permissions import PRINCIPAL
from fieldsync.api._screens import not_visible
from fieldsync.auth import Principal, Role, in_scope
from fieldsync.documents import DocType, InvalidDocId, doc_type
from fieldsync.errors import ErrorCode, FieldsyncError
from fieldsync.replication import Replicator

__all__ = ["AuditRoutes"]

# Who reads the audit trail: the people who answer for the work, not the ones doing it.
AUDITORS = frozenset({Role.SUPERVISOR, Role.MANAGER, Role.ADMIN})
_MAX_PATH = 200


class AuditRoutes:
    def __init__(self, replicator: Replicator, cursor_key: Callable[[], Awaitable[bytes]]) -> None:
        self._replicator = replicator
        self._cursors = Cursors(cursor_key)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/work-orders/{doc_id}/history", rest(self.history)),
            web.get("/v1/conflicts", rest(self.conflicts)),
        ]

    def _auditor(self, request: web.Request) -> Principal:
        principal = request[PRINCIPAL]
        if not principal.roles & AUDITORS:
            raise FieldsyncError(ErrorCode.FORBIDDEN, "for supervisors, managers and admins")
        return principal

    async def history(self, request: web.Request) -> web.StreamResponse:
        """Field changes of one work order, newest first; `path` narrows to one field (and what
        lies below it: `checklist` covers `checklist.2.done`)."""
        principal = self._auditor(request)
        doc_id = request.match_info["doc_id"]
        try:
            is_work_order = doc_type(doc_id) is DocType.WORK_ORDER
        except InvalidDocId:
            is_work_order = False
        index = await self._replicator.store.scope_index(doc_id) if is_work_order else None
        if index is None or not in_scope(self._replicator.policy.scope(principal), index):
            raise not_visible(doc_id[:80])
        path = request.query.get("path") or None
        if path is not None and len(path) > _MAX_PATH:
            raise FieldsyncError(ErrorCode.INVALID_REQUEST, f"path is over {_MAX_PATH} characters")
        binding = ("history", principal.subject, doc_id, path)
        after = await self._cursors.read(request, binding, 2)
        limit = page_size(request)
        position = (int(after[0]), int(after[1])) if after else None
        entries = await self._replicator.store.history(doc_id, path, position, limit + 1)
        page = entries[:limit]
        items = [
            {
                "seq": e.seq,
                "at": e.at,
                "actor": e.actor,
                "origin": str(e.origin),
                "path": e.change.path,
                "old": e.change.old,
                "new": e.change.new,
            }
            for e in page
        ]
        last = page[-1] if page else None
        next_cursor = (
            await self._cursors.make(binding, (str(last.seq), str(last.id)))
            if len(entries) > limit and last is not None
            else None
        )
        return await json_response(request, {"items": items, "next": next_cursor})

    async def conflicts(self, request: web.Request) -> web.StreamResponse:
        """The corrections the domain rules made in the caller's scope, newest first."""
        principal = self._auditor(request)
        binding = ("conflicts", principal.subject)
        after = await self._cursors.read(request, binding, 1)
        limit = page_size(request)
        records = await self._replicator.store.conflicts(
            self._replicator.policy.scope(principal), int(after[0]) if after else None, limit
        )
        items = [
            {
                "id": r.id,
                "seq": r.seq,
                "at": r.at,
                "doc": r.conflict.doc,
                "rule": r.conflict.rule,
                "detail": r.conflict.detail,
                "actor": r.conflict.actor,
                "origin": str(r.conflict.origin),
            }
            for r in records
        ]
        next_cursor = (
            await self._cursors.make(binding, (str(records[-1].id),))
            if len(records) == limit
            else None
        )
        return await json_response(request, {"items": items, "next": next_cursor})
