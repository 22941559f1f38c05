"""An inbound adapter writes documents through the device write path, as its service principal:
the policy's service role decides what it may write, the rules judge it, the field history
names it, and every replica in scope gets its change."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from pycrdt import Array, Doc, Map, Text

from fieldsync import documents
from fieldsync.app import REPLICATOR, STORE
from fieldsync.auth import ClaimMapping, Role
from fieldsync.errors import ErrorCode, FieldsyncError
from fieldsync.records import Origin, OriginKind, ScopeFilter, ScopeKind
from fieldsync.replication import ServiceWriter, SyncStep
from tests.harness import Server, stored_doc
from tests.wire import connect

ERP = Origin(OriginKind.ADAPTER, "erp")


def released(doc: Doc[Any]) -> None:
    documents.work_order.write(
        doc,
        {"number": "4711", "title": "Replace the valve", "team": "north", "region": "east"},
        by=str(ERP),
        role=Role.SERVICE,
    )
    documents.work_order.set_status(doc, "new", by=str(ERP), role=Role.SERVICE)


async def test_an_adapter_creates_and_edits_as_its_service_principal(server: Server) -> None:
    writer = ServiceWriter(server.app[REPLICATOR])
    store = server.app[STORE]
    assert await writer.read("wo:erp-4711") is None
    async with connect(server.sync_url, server.token("sam")) as sam:
        await sam.hello()
        # sam waits for a work order of his team to exist: an empty one so far.
        mine = await sam.replica("wo:erp-4711")
        created = await writer.edit("wo:erp-4711", released, ERP)
        assert created is not None
        # Fan-out: the supervisor of the team gets it as soon as it exists.
        mine.apply_update(await sam.doc_message("wo:erp-4711", SyncStep.UPDATE))
        assert mine.get("fields", type=Map)["title"] == "Replace the valve"

        def retitle(doc: Doc[Any]) -> None:
            doc.get("fields", type=Map)["title"] = "Replace the valve and the seal"

        edited = await writer.edit("wo:erp-4711", retitle, ERP)
        assert edited is not None
        assert edited > created
        mine.apply_update(await sam.doc_message("wo:erp-4711", SyncStep.UPDATE))
        assert mine.get("fields", type=Map)["title"] == "Replace the valve and the seal"

    document = await writer.read("wo:erp-4711")
    assert document is not None
    assert document["fields"]["status"] == "new"
    assert [(e["status"], e["by"], e["role"]) for e in document["status_log"]] == [
        ("new", "adapter:erp", "service")
    ]
    history = await store.history("wo:erp-4711", "fields.title", None, 10)
    assert [(h.seq, h.actor, str(h.origin), h.change.new) for h in history] == [
        (edited, "adapter:erp", "adapter:erp", "Replace the valve and the seal"),
        (created, "adapter:erp", "adapter:erp", "Replace the valve"),
    ]
    # The index the screens and scopes read follows.
    index = await store.index("wo:erp-4711")
    assert index is not None
    assert (index.team, index.title) == (
        "north",
        "Replace the valve and the seal",
    )


async def test_an_edit_that_changes_nothing_is_not_stored(server: Server) -> None:
    writer = ServiceWriter(server.app[REPLICATOR])
    await writer.edit("wo:erp-1", released, ERP)
    head = await server.app[STORE].head()

    def same_title(doc: Doc[Any]) -> None:
        fields = doc.get("fields", type=Map)
        if fields["title"] != "Replace the valve":
            fields["title"] = "Replace the valve"

    assert await writer.edit("wo:erp-1", same_title, ERP) is None
    assert await server.app[STORE].head() == head


async def test_what_the_service_role_may_not_write_is_refused_whole(server: Server) -> None:
    writer = ServiceWriter(server.app[REPLICATOR])
    await writer.edit("wo:erp-2", released, ERP)

    def tick_and_note(doc: Doc[Any]) -> None:
        doc.get("notes", type=Text).insert(0, "from the ERP")
        doc.get("checklist", type=Array).append(Map({"id": "c9", "label": "x", "done": True}))

    with pytest.raises(FieldsyncError) as refused:
        await writer.edit("wo:erp-2", tick_and_note, ERP)
    assert (refused.value.code, refused.value.detail["paths"]) == (
        ErrorCode.FORBIDDEN_FIELD,
        ["checklist"],
    )
    stored = await stored_doc(server, "wo:erp-2")
    assert str(stored.get("notes", type=Text)) == ""  # nothing of the refused edit is kept

    def in_another_name(doc: Doc[Any]) -> None:
        documents.work_order.set_status(doc, "cancelled", by="sam", role="supervisor")

    with pytest.raises(FieldsyncError) as refused:
        await writer.edit("wo:erp-2", in_another_name, ERP)
    assert refused.value.code is ErrorCode.FORBIDDEN_FIELD


async def test_the_rules_judge_an_adapters_status_moves(server: Server) -> None:
    """The service role may cancel an open order, not complete one: the rules revert the move
    and keep a conflict record naming the adapter."""
    writer = ServiceWriter(server.app[REPLICATOR])
    await writer.edit("wo:erp-3", released, ERP)

    def move(status: str) -> Callable[[Doc[Any]], None]:
        return lambda doc: documents.work_order.set_status(
            doc, status, by=str(ERP), role=Role.SERVICE
        )

    await writer.edit("wo:erp-3", move("completed"), ERP)
    assert (await writer.read("wo:erp-3") or {})["fields"]["status"] == "new"
    await writer.edit("wo:erp-3", move("cancelled"), ERP)
    assert (await writer.read("wo:erp-3") or {})["fields"]["status"] == "cancelled"
    # Committed by now: a conflict is written with the next group commit, the cancel's.
    conflicts = await server.app[STORE].conflicts(ScopeFilter(ScopeKind.ALL), None, 10)
    assert [(c.conflict.rule, c.conflict.actor, str(c.conflict.origin)) for c in conflicts] == [
        ("status_transition", "adapter:erp", "adapter:erp")
    ]


def test_no_token_carries_the_service_role() -> None:
    claims = {"sub": "mallory", "roles": ["service", "technician"], "exp": time.time() + 60}
    assert ClaimMapping().principal(claims).roles == {Role.TECHNICIAN}
    with pytest.raises(ValueError, match="service"):
        ClaimMapping(role_names={"robots": "service"})
