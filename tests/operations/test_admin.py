"""The operators' commands, run as an operator runs them, beside a running server: `fieldsync
doc show|history|compact|export|import`, `fieldsync devices`, `fieldsync sessions`."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from pycrdt import Map

from fieldsync.auth import DevIssuer
from tests.harness import running_server, work_order
from tests.operations.cli import fieldsync
from tests.wire import connect

pytestmark = pytest.mark.slow


async def test_an_operator_looks_into_documents_devices_and_sessions(
    tmp_path: Path, issuer: DevIssuer
) -> None:
    data, fresh = tmp_path / "data", tmp_path / "fresh"
    admin, tech = tmp_path / "admin.token", tmp_path / "tech.token"
    admin.write_text(issuer.issue("ada"))
    tech.write_text(issuer.issue("tina"))
    export = tmp_path / "export.jsonl"
    async with running_server(data, issuer) as server:
        async with connect(server.sync_url, server.token("sam")) as sam:
            await sam.hello(device_id="pad-1", platform="ios", version="2.5.0")
            doc = work_order("wo:a1")
            await sam.update("wo:a1", doc.get_update())
            await sam.control("ack")
            before = doc.get_state()
            doc.get("fields", type=Map)["title"] = "Pump 7 leaks"
            await sam.update("wo:a1", doc.get_update(before))
            await sam.control("ack")

        async with connect(server.sync_url, server.token("tina")) as tina:
            welcome = await tina.hello(device_id="phone-3", platform="android", version="2.4.1")
            code, out, err = await fieldsync(
                data, "sessions", "--url", server.url, "--token-file", str(admin), "--json"
            )
            assert code == 0, err
            (session,) = [s for s in orjson.loads(out) if s["id"] == welcome["session"]]
            assert (session["subject"], session["device"]) == ("tina", "phone-3")
            code, _, err = await fieldsync(
                data, "sessions", "--url", server.url, "--token-file", str(tech)
            )
            assert code == 1
            assert "403 forbidden" in err

        code, out, err = await fieldsync(data, "doc", "show", "wo:a1", "--json")
        assert code == 0, err
        shown = orjson.loads(out)
        assert shown["content"]["fields"]["title"] == "Pump 7 leaks"
        assert shown["index"]["assignee"] == "tina"
        assert shown["log_rows"] == 2
        assert (await fieldsync(data, "doc", "show", "wo:nothing"))[0] == 1

        code, out, err = await fieldsync(data, "doc", "history", "wo:a1", "--json")
        assert code == 0, err
        (title,) = [h for h in orjson.loads(out) if h["path"] == "fields.title" and h["old"]]
        assert (title["new"], title["actor"]) == ("Pump 7 leaks", "sam")

        code, out, err = await fieldsync(data, "devices", "--json")
        assert code == 0, err
        devices = {d["device"]: d for d in orjson.loads(out)}
        assert devices["phone-3"]["subject"] == "tina"
        assert devices["pad-1"]["platform"] == "ios"

        code, out, err = await fieldsync(data, "doc", "compact", "--all", "--json")
        assert (code, orjson.loads(out)) == (0, {"docs": 1, "log_rows_merged": 2}), err
        code, out, _ = await fieldsync(data, "doc", "show", "wo:a1", "--json")
        assert orjson.loads(out)["log_rows"] == 0
        assert orjson.loads(out)["content"] == shown["content"]

        code, out, err = await fieldsync(data, "doc", "export", "--all", "--out", str(export))
        assert code == 0, err

    code, out, err = await fieldsync(fresh, "doc", "import", str(export), "--json")
    assert code == 0, err
    assert orjson.loads(out)["changed"] == 1
    code, out, _ = await fieldsync(fresh, "doc", "show", "wo:a1", "--json")
    assert orjson.loads(out)["content"] == shown["content"]
    # Again: the same state adds nothing.
    code, out, _ = await fieldsync(fresh, "doc", "import", str(export), "--json")
    assert (code, orjson.loads(out)["unchanged"]) == (0, 1)
