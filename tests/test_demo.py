"""`fieldsync demo`: a small run converges and says so; the plant floor's alarm becomes a work
order and a meter reading lands in it when the broker is there, and is said skipped when not; a
directory named with `--ldap` gives the users it holds their team and region, and is said
skipped when none is named or failed when it does not answer; a second run on the same data does
not seed again; the command line knows the command."""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fieldsync.demo import LdapOption, run_demo
from fieldsync.demo._dataset import users
from fieldsync.demo._directory import PASSWORD_ENV
from tests.adapters.slapd import (
    READER_DN,
    READER_PASSWORD,
    SUFFIX,
    Slapd,
    base_entries,
    group_entry,
    ldif,
    ou_entry,
    person_dn,
    person_entry,
)


async def small_demo(data_dir: Path) -> int:
    return await run_demo(
        data_dir=data_dir, port=0, work_orders=30, devices=4, rounds=2, stay=False
    )


PLANT_FLOOR = re.compile(
    r"alarm (?P<asset>[A-Z]+-\d+)/overpressure -> (?P<order>wo:alarm-\w+) \(priority \w+\); "
    r"meter (?P=asset) [\d.]+ -> (?P=order) meter_readings"
)


def plant_floor(out: str) -> set[str]:
    """The work order the plant floor's alarm and meter reading landed in (the machine's and
    CI's Mosquitto on 1883: they must when `FIELDSYNC_REQUIRE_SERVICES=1`); none when the
    plant floor was said skipped."""
    line = summary_value(out, "plant floor")
    landed = PLANT_FLOOR.fullmatch(line)
    if landed:
        return {landed.group("order")}
    assert os.environ.get("FIELDSYNC_REQUIRE_SERVICES") != "1", line
    assert line.startswith("skipped: no MQTT broker at 127.0.0.1:1883"), line
    return set()


def summary_value(out: str, label: str) -> str:
    match = re.search(rf"^  {label}\s+(.*)$", out, re.MULTILINE)
    assert match, f"no {label!r} line in:\n{out}"
    return match.group(1)


async def test_small_demo_converges_and_a_restart_does_not_seed_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "demo"

    assert await small_demo(data_dir) == 0
    first = capsys.readouterr().out
    assert "30 work orders and 30 safety-check forms created" in first
    converged = summary_value(first, "converged")
    assert re.match(r"yes: (\d+)/\1 documents", converged), converged
    assert re.match(r"\d+ fields set on 2\+ devices at once", summary_value(first, "conflicts"))
    kept = re.search(r"(\d+)/(\d+) note lines kept", summary_value(first, "conflicts"))
    assert kept
    assert kept.group(1) == kept.group(2)
    assert int(kept.group(1)) > 0
    assert summary_value(first, "refused / resets") == "0 / 0"
    assert summary_value(first, "directory") == "skipped: no directory configured (--ldap)"
    alarm_orders = plant_floor(first)  # a work order more, in the store and in the ERP
    assert f"{60 + len(alarm_orders)} documents" in summary_value(first, "updates stored")
    assert "x smaller" in summary_value(first, "bytes on the wire")
    # Every work order reached the demo's ERP through the outbox, and the file says so too.
    erp = summary_value(first, "ERP \\(erp_sql\\)")
    assert re.match(rf"{30 + len(alarm_orders)} orders \(.*\); \d+ time confirmations", erp), erp
    assert erp.endswith("outbox: 0 still pending, 0 dead letters"), erp
    with sqlite3.connect(data_dir / "erp.db") as db:
        assert db.execute("SELECT COUNT(*) FROM pm_order").fetchone() == (30 + len(alarm_orders),)
        # Time stands confirmed only on completed (TECO) or closed (CLSD) orders: elsewhere each
        # confirmation has its reversal.
        standing = db.execute(
            "SELECT order_id, SUM(NOT reversal) - SUM(reversal) FROM pm_confirmation"
            " JOIN pm_order USING (order_id) WHERE status_code NOT IN ('TECO', 'CLSD')"
            " GROUP BY order_id HAVING SUM(NOT reversal) <> SUM(reversal)"
        ).fetchall()
        assert standing == []

    assert await small_demo(data_dir) == 0
    second = capsys.readouterr().out
    assert "not seeded again" in second
    assert "created offline" not in second
    assert re.match(r"yes: (\d+)/\1 documents", summary_value(second, "converged"))
    # The second alarm counts on the work order the first opened, unless the devices closed it.
    alarm_orders |= plant_floor(second)
    assert f"{60 + len(alarm_orders)} documents" in summary_value(second, "updates stored")


async def test_without_a_broker_the_plant_floor_is_said_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))  # bound, not listening: nothing answers there
        nobody = f"127.0.0.1:{probe.getsockname()[1]}"
        code = await run_demo(
            data_dir=tmp_path, port=0, work_orders=3, devices=1, rounds=0, stay=False, mqtt=nobody
        )
    assert code == 0
    line = summary_value(capsys.readouterr().out, "plant floor")
    assert line.startswith(f"skipped: no MQTT broker at {nobody} ("), line


# A few of the demo's users in the directory, in their teams, with their regions (`st`).
IN_DIRECTORY = {"north": ("aino", "bruno"), "south": ("farah",), "west": ("kai",)}


@pytest.fixture
def demo_directory(tmp_path: Path) -> Iterator[Slapd]:
    """The tests' own slapd, holding `IN_DIRECTORY` under `ou=demo`."""
    slapd = Slapd(tmp_path / "slapd")
    region = {user.subject: user.region or "" for user in users().values()}
    people = [
        person_entry(uid, "demo", st=region[uid]) for team in IN_DIRECTORY.values() for uid in team
    ]
    teams = [
        group_entry(team, "demo", [person_dn(uid, "demo") for uid in uids])
        for team, uids in IN_DIRECTORY.items()
    ]
    slapd.load(base_entries() + "\n" + ldif([ou_entry("demo"), *people, *teams]))
    slapd.start()
    try:
        slapd.ready()
        yield slapd
    finally:
        slapd.stop()


async def test_a_directory_gives_the_users_it_holds_their_team_and_region(
    tmp_path: Path,
    demo_directory: Slapd,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, READER_PASSWORD)
    ldap = LdapOption(demo_directory.url, READER_DN, f"ou=demo,{SUFFIX}")
    code = await run_demo(
        data_dir=tmp_path / "demo",
        port=0,
        work_orders=6,
        devices=2,
        rounds=1,
        stay=False,
        mqtt=None,
        ldap=ldap,
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert summary_value(out, "directory") == (
        f"4 people in 3 teams read from {demo_directory.url}; "
        f"4/{len(users())} principals' team and region from the directory"
    )
    assert re.match(r"yes: (\d+)/\1 documents", summary_value(out, "converged"))
    # The password reaches the adapter through the environment, never through the file.
    adapters = (tmp_path / "demo" / "adapters.toml").read_text()
    assert f'bind_password = {{ env = "{PASSWORD_ENV}" }}' in adapters
    assert READER_PASSWORD not in adapters


async def test_a_directory_that_does_not_answer_is_said_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, READER_PASSWORD)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))  # bound, not listening: nothing answers there
        nobody = f"ldap://127.0.0.1:{probe.getsockname()[1]}"
        code = await run_demo(
            data_dir=tmp_path,
            port=0,
            work_orders=3,
            devices=1,
            rounds=0,
            stay=False,
            mqtt=None,
            ldap=LdapOption(nobody, READER_DN, SUFFIX),
        )
    out = capsys.readouterr().out
    assert code == 0, out
    line = summary_value(out, "directory")
    assert line.startswith(f"FAILED: directory {nobody} unreachable ("), line


async def test_a_directory_without_its_password_does_not_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    ldap = LdapOption("ldap://127.0.0.1:389", READER_DN, SUFFIX)
    code = await run_demo(data_dir=tmp_path, port=0, stay=False, mqtt=None, ldap=ldap)
    assert code == 2
    assert PASSWORD_ENV in capsys.readouterr().err


def test_demo_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fieldsync", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for option in (
        "--data-dir",
        "--port",
        "--work-orders",
        "--devices",
        "--rounds",
        "--exit",
        "--mqtt",
        "--ldap",
        "--ldap-bind-dn",
        "--ldap-base-dn",
    ):
        assert option in done.stdout
