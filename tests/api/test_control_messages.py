"""The `fieldsync.v1` control messages against their JSON Schemas (`ControlHello`… in
`components.schemas` of `openapi/fieldsync.yaml`), on both sides of real sessions:

- what the server sends, captured on the wire through flows that make it send each type
  (welcome, changes, ack, scope, auth_expiring, error with its variants, reset);
- what the Python client (`fieldsync.client.Client`) sends, captured where the server reads it
  (hello, and auth when the server says its token is expiring).

The schemas are held strict as the REST answers are (`tests/contract.py`): a member that changes
type, appears undocumented or goes missing fails.
"""

from __future__ import annotations

import asyncio
from typing import Any

import jsonschema
import pytest
from pycrdt import Doc, Map

from fieldsync.client import Client
from fieldsync.replication import Control, SyncStep, V1Session, decode_frame
from tests import contract
from tests.harness import Server, eventually, work_order
from tests.wire import Wire, connect

SERVER_TYPES = {
    "welcome",
    "changes",
    "ack",
    "scope",
    "auth_expiring",
    "error",
    "reset",
    "view",
    "view_changes",
}
CLIENT_TYPES = {"hello", "auth"}  # what the Python client sends
DASHBOARD_TYPES = {"subscribe", "unsubscribe"}  # what dashboards send besides


def server_control() -> jsonschema.Draft202012Validator:
    return contract.component("ServerControl")


def client_control() -> jsonschema.Draft202012Validator:
    return contract.component("ClientControl")


def problems(validator: jsonschema.Draft202012Validator, message: dict[str, Any]) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(message)]


def test_every_control_message_has_a_schema_and_a_direction() -> None:
    schemas = contract.strict_spec()["components"]["schemas"]
    controls = {
        schema["properties"]["type"]["const"]: schema.get("x-direction")
        for name, schema in schemas.items()
        if name.startswith("Control")
    }
    assert controls == {
        **dict.fromkeys(CLIENT_TYPES | DASHBOARD_TYPES, "client-to-server"),
        **dict.fromkeys(SERVER_TYPES, "server-to-client"),
    }
    listed = {
        name: {ref["$ref"].rsplit("/", 1)[-1] for ref in schemas[name]["oneOf"]}
        for name in ("ClientControl", "ServerControl")
    }
    assert len(listed["ClientControl"]) == len(CLIENT_TYPES | DASHBOARD_TYPES)
    assert len(listed["ServerControl"]) == len(SERVER_TYPES)


async def test_what_the_server_sends_matches_the_schemas(server: Server) -> None:
    wires: list[Wire] = []
    async with (
        connect(server.sync_url, server.token("sam")) as sam,
        connect(server.sync_url, server.token("tina")) as tina,
        connect(server.sync_url, server.token("tom", ttl=2)) as tom,
    ):
        wires += [sam, tina, tom]
        for wire in wires:
            await wire.hello()
        # view and view_changes: the supervisor's dashboard follows the team queue.
        subscribe = {"type": "subscribe", "view": "team-queue", "params": {"limit": 50}}
        assert problems(client_control(), subscribe) == []
        await sam.send(Control(subscribe))
        await sam.control("view", view="team-queue")
        # ack: a supervisor creates a work order; scope: it is assigned to tina, then to tom.
        await sam.update("wo:cm1", work_order("wo:cm1", assignee="tina").get_update())
        await sam.control("ack", doc="wo:cm1")
        await sam.control("view_changes", view="team-queue")
        await tina.control("scope")
        await sam.step1("wo:cm1")
        doc: Doc[Any] = Doc()
        doc.apply_update(await sam.doc_message("wo:cm1", SyncStep.STEP2))
        # error (rule_violation, with rule and detail): a transition the status machine refuses.
        await tina.step1("wo:cm1")
        mine: Doc[Any] = Doc()
        mine.apply_update(await tina.doc_message("wo:cm1", SyncStep.STEP2))
        before = mine.get_state()
        mine.get("fields", type=Map)["status"] = "closed"
        await tina.update("wo:cm1", mine.get_update(before))
        assert (await tina.control("error", doc="wo:cm1"))["code"] == "rule_violation"
        # error (forbidden_field, with paths) and reset: a technician writes the priority.
        before = mine.get_state()
        mine.get("fields", type=Map)["priority"] = "urgent"
        await tina.update("wo:cm1", mine.get_update(before))
        assert (await tina.control("error", code="forbidden_field"))["paths"]
        await tina.control("reset", doc="wo:cm1")
        # error (invalid_doc_id) about a document id that is none.
        await tina.step1("not-a-doc")
        await tina.control("error", code="invalid_doc_id")
        # scope removed and added: the supervisor reassigns it.
        before = doc.get_state()
        doc.get("fields", type=Map)["assignee"] = "tom"
        await sam.update("wo:cm1", doc.get_update(before))
        assert (await tina.control("scope"))["removed"] == ["wo:cm1"]
        assert (await tom.control("scope"))["added"] == ["wo:cm1"]
        # auth_expiring: tom's token lives two seconds; renewing in band is a client message.
        await tom.control("auth_expiring")
        renewal = {"type": "auth", "token": server.token("tom")}
        assert problems(client_control(), renewal) == []
        await tom.send(Control(renewal))
    sent = [message for wire in wires for message in wire.received]
    validator = server_control()
    for message in sent:
        assert problems(validator, message) == [], contract.dumps(message)
    assert {message["type"] for message in sent} == SERVER_TYPES


@pytest.mark.parametrize("since", [True, False, -1, 1 << 60, "7", 2.5, None])
async def test_a_since_that_is_no_seq_is_taken_as_zero(server: Server, since: object) -> None:
    """A JSON `true` is no change sequence, though Python's bool is an int (schemas found the
    server echoing it in `changes`)."""
    async with connect(server.sync_url, server.token("tina")) as wire:
        client = {"platform": "test", "version": "1.0.0", "device_id": "odd"}
        await wire.send(Control({"type": "hello", "client": client, "since": since}))
        changes = await wire.control("changes")
    assert changes["since"] == 0
    assert type(changes["since"]) is int
    assert problems(server_control(), changes) == []


@pytest.fixture
def client_messages(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The control messages every `fieldsync.v1` session of the server receives."""
    received: list[dict[str, Any]] = []
    receive = V1Session.receive

    async def recording(session: V1Session, frame: bytes) -> None:
        for message in decode_frame(frame, max_frame=1 << 30, max_body=1 << 30):
            if isinstance(message, Control):
                received.append(message.body)
        await receive(session, frame)

    monkeypatch.setattr(V1Session, "receive", recording)
    return received


async def test_what_the_python_client_sends_matches_the_schemas(
    server: Server, client_messages: list[dict[str, Any]]
) -> None:
    tokens = iter([server.token("tina", ttl=2)])

    async def token_source() -> str:
        # A first token about to expire, so that the server asks for a renewal; then fresh ones.
        return next(tokens, None) or server.token("tina")

    device = Client(server.sync_url, token_source)
    await device.start()
    try:
        async with asyncio.timeout(10):
            await device.connected.wait()
        device.doc("wo:cm2")
        await eventually(lambda: {m["type"] for m in client_messages} >= CLIENT_TYPES)
    finally:
        await device.close()
    validator = client_control()
    for message in client_messages:
        assert problems(validator, message) == [], contract.dumps(message)


@pytest.mark.parametrize(
    ("message", "side"),
    [
        (
            {
                "type": "welcome",
                "server_seq": "7",
                "session": "s",
                "min_client_version": None,
                "limits": {"max_frame": 1, "max_body": 1, "max_doc_bytes": 1, "rate": 1},
                "token_expires_at": None,
            },
            "server",
        ),
        ({"type": "ack", "doc": "wo:1", "seq": 3, "clock": {"123": 4}, "extra": 1}, "server"),
        ({"type": "ack", "doc": "wo:1", "seq": 3, "clock": {"abc": 4}}, "server"),
        ({"type": "reset", "doc": "wo:1"}, "server"),
        ({"type": "error", "code": "no_such_code", "message": "m"}, "server"),
        (
            {"type": "hello", "client": {"platform": "ios", "version": 2, "device_id": "d"}},
            "client",
        ),
        ({"type": "goodbye"}, "client"),
        ({"type": "subscribe", "view": "everything"}, "client"),
        ({"type": "view", "view": "team-queue", "rows": [{"id": "wo:1"}]}, "server"),
        (
            {"type": "view_changes", "view": "devices", "added": [], "changed": []},
            "server",
        ),
    ],
)
def test_the_schemas_refuse_what_the_protocol_does_not_say(
    message: dict[str, Any], side: str
) -> None:
    validator = server_control() if side == "server" else client_control()
    assert problems(validator, message) != []
