"""The backend-for-frontend screens (issue 5, DESIGN.md §5): one small, purpose-built,
compressed, paginated answer per screen of the apps.

Lists read the projection (`doc_index`) and never load a document; the detail of one work order
loads that one document (and its forms) through the replicator's rooms, so it shows edits not yet
committed exactly as live replicas see them. What a caller sees is its policy scope: a document
outside it and one that does not exist answer alike (403 `forbidden`, the same body), so ids
cannot be probed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pycrdt import Doc

from fieldsync import documents
from fieldsync.api._http import json_response, rest
from fieldsync.api._paging import Cursors, page_size
from fieldsync.api._permissions import PRINCIPAL
from fieldsync.auth import Principal, Role, in_scope
from fieldsync.documents import DocType, InvalidDocId, doc_type
from fieldsync.errors import ErrorCode, FieldsyncError
from fieldsync.replication import Replicator
from fieldsync.storage import Card, Position, Screens

if TYPE_CHECKING:
    from fieldsync.replication import Room

__all__ = ["ScreenRoutes", "card", "not_visible"]

# Forms shown with a work order's detail, by id; a work order has a handful.
FORMS_SHOWN = 50
_MAX_FILTER = 200  # characters of a filter value: subjects and statuses are short


def not_visible(doc_id: str) -> FieldsyncError:
    """The one answer for "absent" and "not yours": same status, same body."""
    return FieldsyncError(ErrorCode.FORBIDDEN, f"{doc_id}: not in your scope")


def card(item: Card, *, assignee: bool = False) -> dict[str, Any]:
    shown = {
        "id": item.id,
        "number": item.number,
        "title": item.title,
        "status": item.status,
        "priority": item.priority,
        "due_at": item.due_at,
        "site": item.site,
        "asset_id": item.asset_id,
        "asset_name": item.asset_name,
    }
    if assignee:
        shown["assignee"] = item.assignee
    return shown


def _require_role(principal: Principal, role: Role, screen: str) -> None:
    if role not in principal.roles:
        raise FieldsyncError(ErrorCode.FORBIDDEN, f"{screen} is for the {role.value} role")


def _filter(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    if value is not None and not 0 < len(value) <= _MAX_FILTER:
        raise FieldsyncError(
            ErrorCode.INVALID_REQUEST, f"{name} must be 1 to {_MAX_FILTER} characters"
        )
    return value


# A work order's `attachments` as a principal's screen shows them, by sha256 (the attachments'
# own module adds whether that principal may read the content: `Attachments.describe`).
Describe = Callable[[Principal, Doc[Any]], Awaitable[dict[str, dict[str, Any]]]]


class ScreenRoutes:
    def __init__(
        self, replicator: Replicator, screens: Screens, describe: Describe | None = None
    ) -> None:
        self._replicator = replicator
        self._screens = screens
        self._describe = describe
        self._cursors = Cursors(screens.cursor_key)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/screens/my-work", rest(self.my_work)),
            web.get("/v1/screens/work-order/{doc_id}", rest(self.work_order)),
            web.get("/v1/screens/team-queue", rest(self.team_queue)),
            web.get("/v1/screens/region-metrics", rest(self.region_metrics)),
        ]

    async def my_work(self, request: web.Request) -> web.StreamResponse:
        """The caller's assigned work orders (inside its scope) as cards, by due time."""
        principal = request[PRINCIPAL]
        binding = ("my-work", principal.subject)
        after = await self._cursors.read(request, binding, 2)
        page = await self._screens.my_work(
            principal.subject,
            self._replicator.policy.scope(principal),
            _position(after),
            page_size(request),
        )
        return await json_response(
            request,
            {
                "items": [card(item) for item in page.cards],
                "next": await self._next(binding, page.next),
            },
        )

    async def team_queue(self, request: web.Request) -> web.StreamResponse:
        """Supervisors: the team's work orders by due time, filtered by `status` and `assignee`,
        with counts per status (the assignee filter applied, the status filter not, so that
        the counts label the status tabs of the same list)."""
        principal = request[PRINCIPAL]
        _require_role(principal, Role.SUPERVISOR, "the team queue")
        status, assignee = _filter(request, "status"), _filter(request, "assignee")
        binding = ("team-queue", principal.subject, status, assignee)
        after = await self._cursors.read(request, binding, 2)
        page = await self._screens.team_queue(
            self._replicator.policy.scope(principal),
            status=status,
            assignee=assignee,
            after=_position(after),
            limit=page_size(request),
        )
        return await json_response(
            request,
            {
                "items": [card(item, assignee=True) for item in page.cards],
                "counts": page.counts or {},
                "next": await self._next(binding, page.next),
            },
        )

    async def region_metrics(self, request: web.Request) -> web.StreamResponse:
        """Regional managers: aggregates per team of the region (definitions in
        `fieldsync.storage.Screens.region_metrics` and the README)."""
        principal = request[PRINCIPAL]
        _require_role(principal, Role.MANAGER, "region metrics")
        binding = ("region-metrics", principal.subject)
        after = await self._cursors.read(request, binding, 1)
        page = await self._screens.region_metrics(
            self._replicator.policy.scope(principal),
            now=time.time(),
            after=after[0] if after else None,
            limit=page_size(request),
        )
        items = [asdict(team) for team in page.teams]
        next_cursor = None
        if page.next is not None:
            next_cursor = await self._cursors.make(binding, (page.next,))
        return await json_response(request, {"items": items, "next": next_cursor})

    async def work_order(self, request: web.Request) -> web.StreamResponse:
        """One work order in full: fields, checklist, notes, time and parts, attachments'
        metadata, its forms with their answers, and its asset's reference data."""
        principal = request[PRINCIPAL]
        doc_id = request.match_info["doc_id"]
        room = await visible_work_order(self._replicator, principal, doc_id)
        content = room.to_json()
        refs = await self._screens.work_order_refs(doc_id, FORMS_SHOWN)
        forms = []
        for form_id in refs.forms:
            form = (await self._replicator.room(form_id)).to_json()
            meta = form.get("meta", {})
            forms.append(
                {
                    "id": form_id,
                    "template": meta.get("template"),
                    "version": meta.get("version"),
                    "answers": form.get("answers", {}),
                    # The server's marks on the answers (field -> reason), kept in the form
                    # by the domain rules; null when it has none.
                    "validation": form.get("validation") or None,
                }
            )
        described = (
            await self._describe(principal, room.ydoc)
            if self._describe is not None
            else content.get("attachments", {})
        )
        attachments = [
            {"sha256": sha256, **(meta if isinstance(meta, dict) else {})}
            for sha256, meta in sorted(described.items())
        ]
        return await json_response(
            request,
            {
                "id": doc_id,
                "seq": room.seq,
                "fields": content["fields"],
                "checklist": content["checklist"],
                "notes": content["notes"],
                "time_entries": content["time_entries"],
                "parts": content["parts"],
                "status_log": content["status_log"],
                "meter_readings": content["meter_readings"],
                "attachments": attachments,
                "forms": forms,
                "asset": refs.asset,
            },
        )

    async def _next(self, binding: tuple[str | None, ...], position: Position | None) -> str | None:
        return None if position is None else await self._cursors.make(binding, position)


def _position(after: tuple[str, ...] | None) -> Position | None:
    return None if after is None else (after[0], after[1])


async def visible_work_order(replicator: Replicator, principal: Principal, doc_id: str) -> Room:
    """The room of work order `doc_id` if `principal` may see it; `forbidden` otherwise, whether
    it is outside the scope, absent, or not a work order at all. The scope is read from the
    projection first, so a probe for ids never loads anything into memory."""
    try:
        is_work_order = doc_type(doc_id) is DocType.WORK_ORDER
    except InvalidDocId:
        is_work_order = False
    if not is_work_order:
        raise not_visible(doc_id[: documents.MAX_DOC_ID])
    index = await replicator.store.scope_index(doc_id)
    if index is None or not in_scope(replicator.policy.scope(principal), index):
        raise not_visible(doc_id)
    room = await replicator.room(doc_id)
    if not room.exists:  # removed from storage since the index was read: absent
        raise not_visible(doc_id)
    return room
