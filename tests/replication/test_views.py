"""Live views over `/v1/sync` as a dashboard sees them: `subscribe` answers `view`, commits bring
`view_changes` (coalesced), and every row is the subscriber's policy scope, checked per change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pycrdt import Map

import fieldsync.auth
from fieldsync.app import REPLICATOR
from fieldsync.auth import DevIssuer, Policy
from fieldsync.replication import Control
from tests import contract
from tests.harness import Server, running_server, work_order
from tests.wire import Wire, connect


async def subscribe(wire: Wire, view: str, **params: Any) -> dict[str, Any]:
    body = {"type": "subscribe", "view": view, "params": params}
    contract.controls("client-to-server")["subscribe"].validate(body)
    await wire.send(Control(body))
    return await wire.control("view", view=view)


async def changes_until(wire: Wire, view: str, done: Any) -> dict[str, Any]:
    """The `view_changes` of `view` until one for which `done(message)` holds."""
    while True:
        message = await wire.control("view_changes", view=view)
        if done(message):
            return message


def ids(rows: list[dict[str, Any]]) -> set[str]:
    return {row["id"] for row in rows}


async def create(wire: Wire, doc_id: str, **fields: Any) -> None:
    await wire.update(doc_id, work_order(doc_id, **fields).get_update())
    await wire.control("ack", doc=doc_id)


async def test_the_team_queue_follows_commits_within_the_supervisors_scope(server: Server) -> None:
    async with (
        connect(server.sync_url, server.token("sam")) as sam,
        connect(server.sync_url, server.token("sue")) as sue,
        connect(server.sync_url, server.token("tina")) as tina,
    ):
        for wire in (sam, sue, tina):
            await wire.hello()
        await create(sam, "wo:1", due_at="2020-01-01")
        await create(sue, "wo:9", team="south", region="west", assignee="ulla", by="sue")

        queue = await subscribe(sam, "team-queue")
        assert ids(queue["rows"]) == {"wo:1"}
        (card,) = queue["rows"]
        assert (card["status"], card["assignee"], card["overdue"]) == ("assigned", "tina", True)
        assert queue["counts"] == {"assigned": 1}
        assert ids((await subscribe(sue, "team-queue"))["rows"]) == {"wo:9"}

        # A new work order of the team appears; the technician's status change moves its card.
        await create(sam, "wo:2")
        added = await changes_until(sam, "team-queue", lambda m: m["added"])
        assert ids(added["added"]) == {"wo:2"}
        replica = await tina.replica("wo:2")
        await tina.move("wo:2", replica, "en_route", "tina", "technician")
        moved = await changes_until(sam, "team-queue", lambda m: m["changed"])
        assert [(r["id"], r["status"]) for r in moved["changed"]] == [("wo:2", "en_route")]
        assert moved["counts"] == {"assigned": 1, "en_route": 1}

        # Moved to another team (an admin's act: a supervisor reassigns within the team): gone
        # from sam's view, in sue's.
        async with connect(server.sync_url, server.token("ada")) as ada:
            await ada.hello()
            theirs = await ada.replica("wo:2")
            await ada.edit("wo:2", theirs, team="south", region="west", assignee="ulla")
            await ada.control("ack", doc="wo:2")
        gone = await changes_until(sam, "team-queue", lambda m: m["removed"])
        assert gone["removed"] == ["wo:2"]
        arrived = await changes_until(sue, "team-queue", lambda m: m["added"])
        assert ids(arrived["added"]) == {"wo:2"}

    # Sue never received a row of sam's team, nor sam one of hers before it moved.
    sue_rows = [
        row["id"]
        for m in sue.received
        if m.get("type") in ("view", "view_changes")
        for row in m.get("rows", []) + m.get("added", []) + m.get("changed", [])
    ]
    assert "wo:1" not in sue_rows
    sam_rows = [
        row["id"]
        for m in sam.received
        if m.get("type") in ("view", "view_changes")
        for row in m.get("rows", []) + m.get("added", []) + m.get("changed", [])
    ]
    assert "wo:9" not in sam_rows


async def test_filters_apply_and_counts_keep_the_assignee_filter(server: Server) -> None:
    async with connect(server.sync_url, server.token("sam")) as sam:
        await sam.hello()
        await create(sam, "wo:1")
        await create(sam, "wo:2", assignee="tom")
        await create(sam, "wo:3", assignee="tom", status="new")
        toms = await subscribe(sam, "team-queue", assignee="tom")
        assert ids(toms["rows"]) == {"wo:2", "wo:3"}
        assert toms["counts"] == {"assigned": 1, "new": 1}
        new = await subscribe(sam, "team-queue", assignee="tom", status="new")
        assert ids(new["rows"]) == {"wo:3"}
        assert new["counts"] == {"assigned": 1, "new": 1}


async def test_commits_are_coalesced_into_few_messages(server: Server) -> None:
    async with connect(server.sync_url, server.token("sam")) as sam:
        await sam.hello()
        await create(sam, "wo:1")
        await subscribe(sam, "team-queue")
        doc = await sam.replica("wo:1")
        for n in range(30):
            await sam.edit("wo:1", doc, title=f"Pump {n}")
        for _ in range(30):
            await sam.control("ack", doc="wo:1")
        last = await changes_until(
            sam, "team-queue", lambda m: any(r["title"] == "Pump 29" for r in m["changed"])
        )
        assert last["added"] == last["removed"] == []
    sent = [m for m in sam.received if m.get("type") == "view_changes"]
    assert len(sent) < 10, f"{len(sent)} messages for 30 commits"


async def test_region_metrics_are_replaced_as_work_moves(server: Server) -> None:
    async with (
        connect(server.sync_url, server.token("sam")) as sam,
        connect(server.sync_url, server.token("mia")) as mia,
    ):
        await sam.hello()
        await mia.hello()
        await create(sam, "wo:1")
        metrics = await subscribe(mia, "region-metrics")
        (north,) = metrics["rows"]
        assert (north["id"], north["total"], north["by_status"]) == ("north", 1, {"assigned": 1})
        await create(sam, "wo:2", due_at="2020-01-01")
        changed = await changes_until(mia, "region-metrics", lambda m: m["changed"])
        (north,) = changed["changed"]
        assert (north["total"], north["overdue"]) == (2, 1)
        # Sam may not see the region's metrics of other teams: his scope is his team.
        assert ids((await subscribe(sam, "region-metrics"))["rows"]) == {"north"}


async def test_the_conflicts_feed_shows_a_rule_correction(server: Server) -> None:
    async with (
        connect(server.sync_url, server.token("sam")) as sam,
        connect(server.sync_url, server.token("tina")) as tina,
    ):
        await sam.hello()
        await tina.hello()
        await create(sam, "wo:1")
        assert (await subscribe(sam, "conflicts"))["rows"] == []
        replica = await tina.replica("wo:1")
        # assigned -> completed skips the status machine: the rules revert it.
        await tina.move("wo:1", replica, "completed", "tina", "technician")
        await tina.control("error", code="rule_violation")
        added = await changes_until(sam, "conflicts", lambda m: m["added"])
        (row,) = added["added"]
        assert (row["doc"], row["actor"], row["team"]) == ("wo:1", "tina", "north")


async def test_devices_show_lag_in_scope(server: Server) -> None:
    async with (
        connect(server.sync_url, server.token("sam")) as sam,
        connect(server.sync_url, server.token("tina")) as tina,
        connect(server.sync_url, server.token("ulla")) as ulla,
    ):
        await sam.hello(device_id="console")
        await tina.hello(device_id="tina-phone", platform="android", version="2.0.0")
        await ulla.hello(device_id="ulla-phone")
        await tina.control("changes")
        await create(sam, "wo:1")
        view = await subscribe(sam, "devices")
        rows = {row["id"]: row for row in view["rows"]}
        # Ulla is in another team; sam's own console is his team's too.
        assert set(rows) == {"tina-phone", "console"}
        phone = rows["tina-phone"]
        assert (phone["subject"], phone["platform"], phone["online"]) == ("tina", "android", True)
        assert phone["lag"] == view["server_seq"] - phone["since"] >= 1
        assert phone["below_min_version"] is False
    async with connect(server.sync_url, server.token("sam")) as sam:
        await sam.hello(device_id="console")
        phone = next(
            r for r in (await subscribe(sam, "devices"))["rows"] if r["id"] == "tina-phone"
        )
        assert phone["online"] is False


async def test_a_device_below_a_raised_minimum_version_is_flagged(
    tmp_path: Path, issuer: DevIssuer
) -> None:
    data = tmp_path / "data"
    async with (
        running_server(data, issuer) as before,
        connect(before.sync_url, before.token("tom")) as tom,
    ):
        await tom.hello(device_id="tom-ipad", platform="ios", version="2.3.9")
        await tom.control("changes")
    # The minimum is raised while the device is away.
    async with (
        running_server(data, issuer, min_client_versions={"ios": "2.4.0"}) as after,
        connect(after.sync_url, after.token("sam")) as sam,
    ):
        await sam.hello(device_id="console")
        rows = (await subscribe(sam, "devices"))["rows"]
        ipad = next(r for r in rows if r["id"] == "tom-ipad")
        assert (ipad["below_min_version"], ipad["min_version"]) == (True, "2.4.0")


async def test_unsubscribe_stops_the_changes(server: Server) -> None:
    async with connect(server.sync_url, server.token("sam")) as sam:
        await sam.hello()
        await subscribe(sam, "team-queue")
        unsubscribe = {"type": "unsubscribe", "view": "team-queue"}
        contract.controls("client-to-server")["unsubscribe"].validate(unsubscribe)
        await sam.send(Control(unsubscribe))
        await create(sam, "wo:1")
        # A later view answers after anything already queued for the first.
        await subscribe(sam, "conflicts")
        await create(sam, "wo:2")
        doc = await sam.replica("wo:2")
        await sam.edit("wo:2", doc, title="again")
        await sam.control("ack", doc="wo:2")
        await subscribe(sam, "devices")
    assert [m for m in sam.received if m.get("view") == "team-queue"][1:] == []


@pytest.mark.parametrize(
    ("subject", "body", "code"),
    [
        ("tina", {"view": "team-queue"}, "forbidden"),
        ("nobody", {"view": "conflicts"}, "forbidden"),
        ("sam", {"view": "everything"}, "invalid_request"),
        ("sam", {"view": "team-queue", "params": {"limit": 100000}}, "invalid_request"),
        ("sam", {"view": "team-queue", "params": {"status": ""}}, "invalid_request"),
        ("sam", {"view": "devices", "params": []}, "invalid_request"),
    ],
)
async def test_a_refused_subscription_is_an_error_naming_the_view(
    server: Server, subject: str, body: dict[str, Any], code: str
) -> None:
    async with connect(server.sync_url, server.token(subject)) as wire:
        await wire.hello()
        await wire.send(Control({"type": "subscribe", **body}))
        error = await wire.control("error", code=code)
        assert error.get("view") == (body["view"] if body["view"] != "everything" else None)
        assert not any(m.get("type") == "view" for m in wire.received)


async def test_a_subscription_before_hello_is_a_protocol_error(server: Server) -> None:
    async with connect(server.sync_url, server.token("sam")) as sam:
        await sam.send(Control({"type": "subscribe", "view": "team-queue"}))
        code, _ = await sam.closed_with()
        assert code == 4400


async def test_a_field_only_edit_changes_the_row(server: Server) -> None:
    async with connect(server.sync_url, server.token("sam")) as sam:
        await sam.hello()
        await create(sam, "wo:1")
        await subscribe(sam, "team-queue")
        doc = await sam.replica("wo:1")
        before = doc.get_state()
        doc.get("fields", type=Map)["priority"] = "urgent"
        await sam.update("wo:1", doc.get_update(before))
        changed = await changes_until(sam, "team-queue", lambda m: m["changed"])
        assert changed["changed"][0]["priority"] == "urgent"


async def test_a_policy_reloaded_with_another_scope_moves_the_view(
    server: Server, tmp_path: Path
) -> None:
    """SIGHUP may give supervisors their region instead of their team: the scope is read again
    at the next change, and the view starts over in the new one."""
    shipped = Path(fieldsync.auth.__file__).with_name("policy.toml").read_text()
    wider = tmp_path / "policy.toml"
    wider.write_text(
        shipped.replace(
            '[roles.supervisor]\ntransitions = ["*"]\nscope = "team"',
            '[roles.supervisor]\ntransitions = ["*"]\nscope = "region"',
        )
    )
    async with connect(server.sync_url, server.token("sam")) as sam:
        await sam.hello()
        await create(sam, "wo:1")
        async with connect(server.sync_url, server.token("mia")) as mia:
            await mia.hello()
            await create(mia, "wo:2", team="east-2", by="mia", role="manager")
        assert ids((await subscribe(sam, "team-queue"))["rows"]) == {"wo:1"}
        server.app[REPLICATOR].policy = Policy.load(wider)
        await create(sam, "wo:3")
        again = await sam.control("view", view="team-queue")
        assert ids(again["rows"]) == {"wo:1", "wo:2", "wo:3"}
