"""Seeding through the server: each team's supervisor creates the team's work orders and their
safety-check forms offline on their device, then syncs them, as a supervisor planning the week on
a laptop would. What the server already stores is never created twice."""

from __future__ import annotations

from fieldsync import documents
from fieldsync.demo import _dataset, _devices
from fieldsync.demo._devices import Device, Fleet
from fieldsync.demo._report import Progress
from fieldsync.demo._server import Running
from fieldsync.records import ScopeFilter, ScopeKind
from fieldsync.storage import Store


async def stored_ids(store: Store) -> set[str]:
    """Every document the server stores (the change feed, with an admin's scope)."""
    ids: set[str] = set()
    since = 0
    while True:
        page = await store.changes(ScopeFilter(ScopeKind.ALL), since, 1000)
        ids.update(d.id for d in page.docs)
        since = page.upto
        if not page.more:
            return ids


async def seed(
    server: Running, fleet: Fleet, progress: Progress, dataset: list[_dataset.SeedWorkOrder]
) -> None:
    existing = await stored_ids(server.store)
    missing = [wo for wo in dataset if wo.doc_id not in existing or wo.form_id not in existing]
    if not missing:
        progress.line(
            "seed",
            f"the data folder holds the dataset already ({len(existing)} documents): "
            "not seeded again",
        )
        return
    teams = [team for team in _dataset.TEAMS if any(wo.team == team for wo in missing)]
    seeders: list[Device] = []
    for team in teams:
        boss = _dataset.supervisor(team)
        device = fleet.get(boss.subject, boss)
        _create(device, [wo for wo in missing if wo.team == team], existing)
        await device.client.start()
        seeders.append(device)
    await _devices.wait_all(seeders, "acknowledge the new documents", _devices.acked)
    for device in seeders:
        await device.client.go_offline()

    new = await stored_ids(server.store) - existing
    refused = sum(len(d.client.errors) for d in seeders)
    progress.line(
        "seed",
        f"{sum(1 for wo in dataset if wo.doc_id in new)} work orders and "
        f"{sum(1 for wo in dataset if wo.form_id in new)} safety-check forms created offline on "
        f"the supervisors' devices ({', '.join(d.name for d in seeders)}) and acknowledged by "
        "the server"
        + (f" ({len(existing)} documents were stored already)" if existing else "")
        + (f"; {refused} REFUSED" if refused else ""),
    )


def _create(device: Device, wos: list[_dataset.SeedWorkOrder], existing: set[str]) -> None:
    client = device.client
    for wo in wos:
        # Not what the server stores, nor what this device created before and has still to sync.
        if wo.doc_id not in existing and wo.doc_id not in client.docs:
            documents.work_order.write(
                client.doc(wo.doc_id),
                wo.fields,
                wo.checklist,
                wo.notes,
                by=device.user.subject,
                role=device.user.roles[0],
            )
        if wo.form_id not in existing and wo.form_id not in client.docs:
            documents.form.write(
                client.doc(wo.form_id),
                wo.doc_id,
                _dataset.SAFETY_TEMPLATE,
                _dataset.SAFETY_VERSION,
                wo.form_answers,
            )
