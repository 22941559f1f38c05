"""An app's use of the client generated from `openapi/fieldsync.yaml`: the three main screens.

`test_contract_client.py` generates the client (`fieldsync_client`) from the committed document,
type-checks this file against it with mypy, then runs it against a running server. The types
here are what an app's code relies on: when the document changes a member's type, the generated
client changes with it and this file no longer type-checks, so the build breaks, not the app.
"""

from __future__ import annotations

from dataclasses import dataclass

from fieldsync_client import AuthenticatedClient
from fieldsync_client.api.screens import my_work, team_queue, work_order_screen
from fieldsync_client.models import MyWorkPage, Problem, TeamQueuePage, WorkOrderScreen
from fieldsync_client.types import UNSET, Unset


class ScreenError(Exception):
    def __init__(self, problem: Problem | None) -> None:
        super().__init__(problem.code if problem else "no answer")
        self.problem = problem


@dataclass(frozen=True)
class Row:
    """A line of a list screen, as the app draws it."""

    id: str
    number: str | None
    title: str
    status: str | None
    due_at: str | None
    asset: str | None
    assignee: str | None = None


@dataclass(frozen=True)
class Detail:
    id: str
    seq: int
    title: str
    checklist_done: int
    checklist_total: int
    notes: str
    photos: list[tuple[str, bool]]  # sha256, still missing
    forms: list[str]
    asset_name: str | None


@dataclass(frozen=True)
class Queue:
    rows: list[Row]
    counts: dict[str, int]
    total: int


async def my_work_rows(client: AuthenticatedClient, page_size: int = 2) -> list[Row]:
    """Every page of the technician's work, following the cursors."""
    rows: list[Row] = []
    cursor: str | Unset = UNSET
    while True:
        page = await my_work.asyncio(client=client, limit=page_size, cursor=cursor)
        if not isinstance(page, MyWorkPage):
            raise ScreenError(page)
        for card in page.items:
            rows.append(
                Row(
                    card.id,
                    card.number,
                    card.title or "",
                    card.status,
                    card.due_at,
                    card.asset_name,
                )
            )
        if page.next_ is None:
            return rows
        cursor = page.next_


async def detail(client: AuthenticatedClient, doc_id: str) -> Detail:
    screen = await work_order_screen.asyncio(doc_id, client=client)
    if not isinstance(screen, WorkOrderScreen):
        raise ScreenError(screen)
    items = [item.additional_properties for item in screen.checklist]
    title = screen.fields.additional_properties.get("title")
    asset = screen.asset.additional_properties if screen.asset is not None else {}
    name = asset.get("name")
    return Detail(
        id=screen.id,
        seq=screen.seq,
        title=title if isinstance(title, str) else "",
        checklist_done=sum(1 for item in items if item.get("done") is True),
        checklist_total=len(items),
        notes=screen.notes,
        photos=[(entry.sha256, entry.missing) for entry in screen.attachments],
        forms=[form.id for form in screen.forms],
        asset_name=name if isinstance(name, str) else None,
    )


async def queue(client: AuthenticatedClient, status: str | None = None) -> Queue:
    page = await team_queue.asyncio(client=client, status=UNSET if status is None else status)
    if not isinstance(page, TeamQueuePage):
        raise ScreenError(page)
    counts: dict[str, int] = dict(page.counts.additional_properties)
    rows = [
        Row(
            card.id,
            card.number,
            card.title or "",
            card.status,
            card.due_at,
            card.asset_name,
            card.assignee,
        )
        for card in page.items
    ]
    return Queue(rows, counts, sum(counts.values()))
