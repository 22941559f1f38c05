"""What devices need over REST when a WebSocket is not an option (issue 5): the change feed since
a sequence number, a work order's JSON projection, and creating a work order.

A creation goes through the one write path (`Replicator.create`): the server builds the pycrdt
document, the policy's creation rights decide as they do for a device's first update, and it is
committed, acknowledged and fanned out like any other update.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import orjson
from aiohttp import hdrs, web
from pycrdt import Doc

from fieldsync import documents
from fieldsync.api._http import json_response, rest
from fieldsync.api._paging import page_size
from fieldsync.api._permissions import PRINCIPAL
from fieldsync.api._screens import not_visible, visible_work_order
from fieldsync.auth import Principal, in_scope
from fieldsync.documents import DocType, InvalidDocId, doc_type
from fieldsync.errors import ErrorCode, FieldsyncError
from fieldsync.records import Origin, OriginKind
from fieldsync.replication import AlreadyExists, Replicator, edit_as

__all__ = ["WorkOrderRoutes", "parse_new_work_order"]

WORK_ORDERS = "/v1/work-orders"
ORIGIN = Origin(OriginKind.REST)  # the origin of what REST writes

_MAX_BODY = 64 * 1024
_MAX_CHECKLIST = 100

# The `fields` a creation may set (DESIGN.md §2) and the longest value of each.
_FIELDS = {
    "number": 64,
    "title": 200,
    "description": 10_000,
    "status": 32,
    "priority": 32,
    "assignee": 200,
    "team": 200,
    "region": 200,
    "asset_id": 200,
    "site": 200,
    "due_at": 64,
    "erp_ref": 64,
}
# The statuses a work order is created in: the write path's one creation rule, read here to
# name the problem in the request's own terms.
NEW_STATUSES = documents.work_order.CREATION_STATUSES
_Wrong = Callable[[str, str], None]
PRIORITIES = ("low", "normal", "high", "urgent")


class WorkOrderRoutes:
    def __init__(self, replicator: Replicator, *, changes_page: int) -> None:
        self._replicator = replicator
        self._changes_page = changes_page

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/changes", rest(self.changes)),
            web.get(WORK_ORDERS + "/{doc_id}", rest(self.get)),
            web.post(WORK_ORDERS, rest(self.create)),
            web.post(WORK_ORDERS + "/{doc_id}/reassign", rest(self.reassign)),
            web.post(WORK_ORDERS + "/{doc_id}/cancel", rest(self.cancel)),
        ]

    async def changes(self, request: web.Request) -> web.StreamResponse:
        """The `changes` message of fieldsync.v1 over HTTP: documents in the caller's scope
        changed after `since` (by seq), those that left it, and `upto`, the `since` to ask for
        next (move to it only once every listed document is synced); `more` says another page
        follows. The sequence number is the cursor: it is what a device keeps anyway."""
        principal = request[PRINCIPAL]
        raw = request.query.get("since", "0")
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
            raise FieldsyncError(ErrorCode.INVALID_REQUEST, "since must be a change sequence >= 0")
        limit = page_size(request, default=self._changes_page, maximum=self._changes_page)
        page = await self._replicator.store.changes(
            self._replicator.policy.scope(principal), int(raw), limit
        )
        return await json_response(
            request,
            {
                "since": page.since,
                "upto": page.upto,
                "docs": [{"id": d.id, "type": d.type, "seq": d.seq} for d in page.docs],
                "removed": page.removed,
                "more": page.more,
            },
        )

    async def get(self, request: web.Request) -> web.StreamResponse:
        """A work order's JSON projection: every root of the document, and `seq`, the change
        sequence of its last stored update."""
        room = await visible_work_order(
            self._replicator, request[PRINCIPAL], request.match_info["doc_id"]
        )
        return await json_response(request, {"id": room.doc_id, "seq": room.seq, **room.to_json()})

    async def create(self, request: web.Request) -> web.StreamResponse:
        """Create a work order from `{"id"?, "fields", "checklist"?, "notes"?}`; 201 with its
        Location and JSON projection once it is durable. A client may name the id (a
        `wo:<id>`) so that a retry after a lost answer cannot create a second one: the retry
        gets 409 `already_exists` with the Location."""
        principal: Principal = request[PRINCIPAL]
        if request.content_type != "application/json":
            raise FieldsyncError(
                ErrorCode.UNSUPPORTED_MEDIA_TYPE, "send the work order as application/json"
            )
        if request.content_length is not None and request.content_length > _MAX_BODY:
            raise FieldsyncError(ErrorCode.INVALID_REQUEST, f"at most {_MAX_BODY} bytes")
        # Bounded by the application's client_max_size too, for a body sent without a length.
        body = await request.read()
        if len(body) > _MAX_BODY:
            raise FieldsyncError(ErrorCode.INVALID_REQUEST, f"at most {_MAX_BODY} bytes")
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise FieldsyncError(ErrorCode.INVALID_REQUEST, "the body is not JSON") from None
        doc_id, fields, checklist, notes = parse_new_work_order(data, principal)
        ydoc: Doc[Any] = Doc()
        role = self._replicator.policy.acting_role(principal) or ""
        documents.work_order.write(ydoc, fields, checklist, notes, by=principal.subject, role=role)
        try:
            await self._replicator.create(doc_id, ydoc.get_update(), principal, ORIGIN)
        except AlreadyExists:
            # Only a caller who may see it learns that it exists, and where.
            index = await self._replicator.store.scope_index(doc_id)
            if not in_scope(self._replicator.policy.scope(principal), index):
                raise not_visible(doc_id) from None
            raise FieldsyncError(
                ErrorCode.ALREADY_EXISTS,
                f"{doc_id} exists already",
                location=f"{WORK_ORDERS}/{doc_id}",
            ) from None
        room = await self._replicator.room(doc_id)
        return await json_response(
            request,
            {"id": doc_id, "seq": room.seq, **room.to_json()},
            status=201,
            headers={hdrs.LOCATION: f"{WORK_ORDERS}/{doc_id}"},
        )

    async def reassign(self, request: web.Request) -> web.StreamResponse:
        """Give the work order to `assignee` (null: nobody), and optionally another `team` and
        `region`, as the caller's update through the device write path: the same field rights
        (a supervisor reassigns within the team), scopes, history and fan-out. 200 with the
        projection once durable."""
        body = await _json_body(request, {"assignee", "team", "region"})
        changes: dict[str, Any] = {}
        for key in ("assignee", "team", "region"):
            if key not in body:
                continue
            value = body[key]
            if value is not None and (not isinstance(value, str) or not 0 < len(value) <= 200):
                raise FieldsyncError(
                    ErrorCode.INVALID_REQUEST, f"{key} must be null or text of 1 to 200 characters"
                )
            changes[key] = value
        if "assignee" not in changes:
            raise FieldsyncError(ErrorCode.INVALID_REQUEST, "assignee is required (null: nobody)")

        def move(doc: Doc[Any]) -> None:
            documents.work_order.reassign(doc, **changes)

        return await self._edit(request, move)

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        """Cancel the work order: an entry `cancelled` in its status log in the caller's name
        and role, judged by the rules as a device's (a supervisor's cancel dominates a
        technician's offline completion; a closed work order stays closed: 409)."""
        await _json_body(request, set(), required=False)
        principal: Principal = request[PRINCIPAL]
        role = self._replicator.policy.acting_role(principal) or ""

        def cancelled(doc: Doc[Any]) -> None:
            documents.work_order.set_status(doc, "cancelled", by=principal.subject, role=role)

        return await self._edit(request, cancelled)

    async def _edit(
        self, request: web.Request, change: Callable[[Doc[Any]], None]
    ) -> web.StreamResponse:
        principal: Principal = request[PRINCIPAL]
        room = await visible_work_order(self._replicator, principal, request.match_info["doc_id"])
        edited = await edit_as(self._replicator, principal, ORIGIN, room.doc_id, change)
        if edited.violations:
            rule, detail = edited.violations[0]
            raise FieldsyncError(ErrorCode.RULE_VIOLATION, detail, rule=rule)
        room = await self._replicator.room(room.doc_id)
        return await json_response(request, {"id": room.doc_id, "seq": room.seq, **room.to_json()})


async def _json_body(
    request: web.Request, members: set[str], *, required: bool = True
) -> dict[str, Any]:
    """The request's JSON object (an empty one when none is sent and none is required)."""
    body = await request.read()
    if not body and not required:
        return {}
    if request.content_type != "application/json":
        raise FieldsyncError(ErrorCode.UNSUPPORTED_MEDIA_TYPE, "send application/json")
    if len(body) > _MAX_BODY:
        raise FieldsyncError(ErrorCode.INVALID_REQUEST, f"at most {_MAX_BODY} bytes")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise FieldsyncError(ErrorCode.INVALID_REQUEST, "the body is not JSON") from None
    if not isinstance(data, dict):
        raise FieldsyncError(ErrorCode.INVALID_REQUEST, "the body must be a JSON object")
    unknown = sorted(set(data) - members)
    if unknown:
        raise FieldsyncError(ErrorCode.INVALID_REQUEST, f"not taken here: {unknown[0][:64]}")
    return data


def parse_new_work_order(
    data: Any, principal: Principal
) -> tuple[str, dict[str, Any], list[Mapping[str, Any]], str]:
    """(id, fields, checklist, notes) of a creation request, with defaults filled in: the
    creator's team and region, status `assigned` when an assignee is named (else `new`),
    priority `normal`, checklist ids c1, c2… Raises `invalid_request` listing every problem."""
    errors: list[dict[str, str]] = []

    def wrong(path: str, message: str) -> None:
        errors.append({"path": path, "message": message})

    if not isinstance(data, dict):
        raise FieldsyncError(ErrorCode.INVALID_REQUEST, "the body must be a JSON object")
    for key in sorted(set(data) - {"id", "fields", "checklist", "notes"}):
        wrong(key[:64], "not a member of a new work order")
    doc_id = _doc_id(data.get("id"), wrong)
    fields = _fields(data.get("fields"), principal, wrong)
    checklist = _checklist(data.get("checklist", []), wrong)
    notes = data.get("notes", "")
    if not isinstance(notes, str) or len(notes) > 50_000:
        wrong("notes", "must be text of at most 50000 characters")
    if errors:
        raise FieldsyncError(
            ErrorCode.INVALID_REQUEST, "the work order is not valid", errors=errors
        )
    return doc_id, fields, checklist, notes


def _doc_id(value: Any, wrong: _Wrong) -> str:
    if value is None:
        return f"wo:{uuid.uuid4().hex}"
    try:
        if isinstance(value, str) and doc_type(value) is DocType.WORK_ORDER:
            return value
    except InvalidDocId:
        pass
    wrong("id", "must be wo:<id>, <id> of 1-64 letters, digits, '.', '_' or '-'")
    return ""


def _fields(value: Any, principal: Principal, wrong: _Wrong) -> dict[str, Any]:
    if not isinstance(value, dict):
        wrong("fields", "must be an object")
        return {}
    fields: dict[str, Any] = {}
    for key, item in value.items():
        if key not in _FIELDS:
            wrong(f"fields.{key[:64]}", "not a field of a work order")
        elif item is None:
            continue
        elif not isinstance(item, str) or len(item) > _FIELDS[key]:
            wrong(f"fields.{key}", f"must be text of at most {_FIELDS[key]} characters")
        else:
            fields[key] = item
    if not fields.get("title", "").strip():
        wrong("fields.title", "is required")
    # A supervisor plans for its own team: the policy then checks that the team is in scope.
    for key, default in (("team", principal.team), ("region", principal.region)):
        if key not in fields and default is not None:
            fields[key] = default
    fields.setdefault("status", "assigned" if fields.get("assignee") else "new")
    if fields["status"] not in NEW_STATUSES:
        wrong("fields.status", f"a new work order is one of {', '.join(NEW_STATUSES)}")
    fields.setdefault("priority", "normal")
    if fields["priority"] not in PRIORITIES:
        wrong("fields.priority", f"must be one of {', '.join(PRIORITIES)}")
    if "due_at" in fields:
        try:
            datetime.fromisoformat(fields["due_at"])
        except ValueError:
            wrong("fields.due_at", "must be an ISO 8601 date or date-time")
    return fields


def _checklist(value: Any, wrong: _Wrong) -> list[Mapping[str, Any]]:
    if not isinstance(value, list) or len(value) > _MAX_CHECKLIST:
        wrong("checklist", f"must be a list of at most {_MAX_CHECKLIST} items")
        return []
    items: list[Mapping[str, Any]] = []
    seen: set[str] = set()
    for n, entry in enumerate(value):
        path = f"checklist.{n}"
        if not isinstance(entry, dict):
            wrong(path, "must be an object")
            continue
        for key in sorted(set(entry) - {"id", "label", "required"}):
            wrong(f"{path}.{key[:64]}", "not a member of a checklist item")
        label = entry.get("label")
        if not isinstance(label, str) or not label.strip() or len(label) > 500:
            wrong(f"{path}.label", "must be text of 1 to 500 characters")
        required = entry.get("required", False)
        if not isinstance(required, bool):
            wrong(f"{path}.required", "must be true or false")
        item_id = entry.get("id", f"c{n + 1}")
        if not isinstance(item_id, str) or not 0 < len(item_id) <= 64 or item_id in seen:
            wrong(f"{path}.id", "must be a unique text of 1 to 64 characters")
        else:
            seen.add(item_id)
        items.append({"id": item_id, "label": label, "required": required, "done": False})
    return items
