"""`@fieldsync/client` beside the other clients of the same work order: a Python
`fieldsync.client` device and a stock y-websocket provider, all three editing offline at once,
converge on one document, the server's."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pycrdt import Array, Doc, Map, Text

from fieldsync import documents
from fieldsync.auth import DevIssuer
from tests.clients.conftest import TsDevice, TsDeviceFactory
from tests.harness import Server, stored_doc, work_order
from tests.interop.conftest import YjsPeer, YjsPeerFactory
from tests.interop.test_yjs_interop import canonical, js_state_vector, py_content, py_state_vector

DOC = "wo:ts-interop-1"


async def converged(
    ts: TsDevice, yjs: YjsPeer, doc: Doc[Any], timeout: float = 15.0
) -> dict[str, Any]:
    """Wait until the TypeScript and the Yjs replicas have the Python replica's content and
    state vector. Nothing announces "every side has it all": ask again after each answer."""
    want: tuple[str, dict[int, int]] = ("", {})
    seen: list[Any] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                want = (canonical(py_content(doc)), py_state_vector(doc))
                ts_dump, js_dump = await ts.dump_doc(DOC), await yjs.dump()
                seen = [ts_dump, js_dump]
                ts_json = {k: ts_dump["json"][k] for k in ("fields", "checklist", "notes")}
                if (canonical(ts_json), js_state_vector(ts_dump)) == want and (
                    canonical(js_dump["json"]),
                    js_state_vector(js_dump),
                ) == want:
                    return ts_dump
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"no convergence:\npython: {want}\nts, yjs: {seen}") from None


async def test_ts_python_and_yjs_devices_converge(
    server: Server[DevIssuer], ts_device: TsDeviceFactory, yjs_peer: YjsPeerFactory, tmp_path: Path
) -> None:
    sam = server.client("sam")
    await sam.start()
    sam.doc(DOC).apply_update(work_order(DOC, assignee="tina").get_update())
    await sam.wait_acked(DOC)

    ts = await ts_device(server, "tina", tmp_path / "ts.json")
    py = server.client("tina", device_id="tina-python")
    yjs = await yjs_peer(DOC)
    await ts.start()
    await ts.wait_synced(DOC)
    await py.start()
    await py.wait_synced(DOC)
    assert (await yjs.connect(server.token("tina")))["ok"]

    # All three go offline and edit the same work order.
    await asyncio.gather(ts.stop(), py.go_offline(), yjs.disconnect())
    await ts.edit_doc(
        DOC,
        [{"status": "en_route"}, {"insert": [0.0, "ts-note "]}, {"check": [0.0, True]}],
    )
    doc = py.doc(DOC)
    documents.work_order.record_meter_reading(doc, 7, by="tina")
    doc.get("notes", type=Text).insert(0, "py-note ")
    # (A technician may tick items but not add them, in any client.)
    await yjs.edit([{"insert": [1.0, "yjs-note "]}, {"insert": [0.0, "yjs-first "]}])

    # Back online together: every edit goes up, is acknowledged, and reaches every replica.
    await asyncio.gather(ts.start(), py.start(), yjs.connect(server.token("tina")))
    await asyncio.gather(ts.wait_acked(), py.wait_acked())
    assert (await ts.state())["pending"] == 0
    dump = await converged(ts, yjs, doc)

    fields = doc.get("fields", type=Map).to_py()
    assert fields["status"] == "en_route"
    assert fields["meter_reading"] == 7
    notes = str(doc.get("notes", type=Text))
    assert all(word in notes for word in ("ts-note", "py-note", "yjs-note", "yjs-first")), notes
    checklist = doc.get("checklist", type=Array).to_py()
    assert [(item["id"], item["done"]) for item in checklist] == [("c1", True)]
    log = [(e["status"], e["by"], e["role"]) for e in dump["json"]["status_log"]]
    assert log == [("assigned", "sam", "supervisor"), ("en_route", "tina", "technician")]
    # The server holds the same document.
    stored = await stored_doc(server, DOC)
    assert canonical(py_content(stored)) == canonical(py_content(doc))
    await py.close()
    await sam.close()
