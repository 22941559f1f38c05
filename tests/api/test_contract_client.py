"""A client generated from the committed contract, compiled and used against a running server.

The client is generated in the test (openapi-python-client, from `openapi/fieldsync.yaml` as the
server reads it), so it is always the committed document's. It must generate without a warning
(every operation in it), type-check with mypy together with `client_app.py` (an app's use of the
my-work, work order and team queue screens), and then serve those screens from a real server,
every answer parsed into the generated models and each value of the type they declare.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import yaml

from tests import contract
from tests.harness import Server

# Generating the client and type-checking it are each given 300 s of their own (`run`, `mypy`).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PACKAGE = "fieldsync_client"
APP = Path(__file__).with_name("client_app.py")
# Bodies that are not JSON reach the generated client as bytes (its `File`).
GENERATOR_CONFIG = {
    "package_name_override": PACKAGE,
    "content_type_overrides": {
        media: "application/octet-stream"
        for media in ("application/x-ndjson", *contract.BINARY_TYPES)
    },
}


def run(*command: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(command)}:\n{output[-6000:]}"
    return output


# The apps' client: every operation but the reference imports, which adapters call with a JSON
# lines body (an array of rows, one per line) that the generator cannot send.
ADAPTER_ONLY = {("put", "/v1/reference/{dataset}"), ("patch", "/v1/reference/{dataset}")}


def app_contract() -> dict[str, Any]:
    spec = contract.committed()
    for method, path in ADAPTER_ONLY:
        del spec["paths"][path][method]
    return spec


def generate(spec: dict[str, Any], where: Path, *options: str) -> str:
    (where / "spec.json").write_text(json.dumps(spec))
    (where / "config.yaml").write_text(yaml.safe_dump(GENERATOR_CONFIG))
    return run(
        sys.executable,
        "-m",
        "openapi_python_client",
        "generate",
        "--path",
        "spec.json",
        "--config",
        "config.yaml",
        "--output-path",
        PACKAGE,
        "--meta",
        "none",
        *options,
        cwd=where,
    )


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The generated package's parent folder, importable for the module's tests."""
    where = tmp_path_factory.mktemp("client")
    output = generate(app_contract(), where, "--fail-on-warning")
    assert "Warning" not in output, output
    sys.path.insert(0, str(where))
    try:
        yield where
    finally:
        sys.path.remove(str(where))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]
        sys.modules.pop("tests.api.client_app", None)


def mypy(where: Path) -> subprocess.CompletedProcess[str]:
    """mypy, strict, over the generated package and a copy of the app beside it."""
    (where / APP.name).write_text(APP.read_text())
    (where / "mypy.ini").write_text(MYPY_CONFIG)
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", PACKAGE, APP.name],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=300,
    )


MYPY_CONFIG = """[mypy]
python_version = 3.11
strict = true
incremental = false
cache_dir = /dev/null

# The generator's own client template passes `*args` on to httpx's `__exit__`, which mypy 1.x
# types more precisely than the template does: its code, not ours, and not the contract's.
[mypy-fieldsync_client.client]
disable_error_code = arg-type
"""


def test_the_generated_client_and_its_use_type_check(generated: Path) -> None:
    checked = mypy(generated)
    assert checked.returncode == 0, checked.stdout[-6000:]


def test_a_type_change_in_the_contract_breaks_the_build(generated: Path, tmp_path: Path) -> None:
    """The same app code against a client generated from a document where the cards' `title`
    became an integer: mypy refuses it."""
    changed = app_contract()
    for card in ("Card", "QueueCard"):
        changed["components"]["schemas"][card]["properties"]["title"]["type"] = ["integer", "null"]
    generate(changed, tmp_path)
    checked = mypy(tmp_path)
    assert checked.returncode == 1, checked.stdout
    errors = [line for line in checked.stdout.splitlines() if ": error:" in line]
    assert errors, checked.stdout
    assert all(line.startswith(APP.name) for line in errors), checked.stdout


async def test_the_generated_client_serves_the_main_screens(
    generated: Path, server: Server
) -> None:
    from fieldsync_client import AuthenticatedClient

    from tests.api import client_app

    await _seed(server)
    tina = AuthenticatedClient(base_url=server.url, token=server.token("tina"))
    sam = AuthenticatedClient(base_url=server.url, token=server.token("sam"))
    async with tina, sam:
        rows = await client_app.my_work_rows(tina)
        assert [row.id for row in rows] == ["wo:gc0", "wo:gc1", "wo:gc2"]
        assert rows[0] == client_app.Row(
            "wo:gc0", "GC-0", "Inspect pump 0", "assigned", "2026-12-01", "Feed pump"
        )
        shown = await client_app.detail(tina, "wo:gc1")
        assert (shown.title, shown.checklist_total, shown.checklist_done) == (
            "Inspect pump 1",
            2,
            0,
        )
        assert (shown.asset_name, shown.notes, shown.photos) == ("Feed pump", "Leaking", [])
        queue = await client_app.queue(sam)
        assert queue.counts == {"assigned": 3, "new": 1}
        assert queue.total == 4
        assert {row.assignee for row in queue.rows} == {"tina", None}
        assigned = await client_app.queue(sam, status="assigned")
        assert len(assigned.rows) == 3
        with pytest.raises(client_app.ScreenError) as refused:
            await client_app.queue(tina)
        assert refused.value.problem is not None
        assert refused.value.problem.code == "forbidden"
        # What the generated models parsed is of the types they declare.
        from fieldsync_client.api.screens import (
            my_work,
            team_queue,
            work_order_screen,
        )

        conforms(await my_work.asyncio(client=tina))
        conforms(await work_order_screen.asyncio("wo:gc1", client=tina))
        conforms(await team_queue.asyncio(client=sam))


async def _seed(server: Server) -> None:
    import aiohttp

    headers = {"Authorization": f"Bearer {server.token('sam')}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        for n in range(4):
            fields = {
                "number": f"GC-{n}",
                "title": f"Inspect pump {n}",
                "asset_id": "P-9",
                "due_at": f"2026-12-0{n + 1}",
            }
            if n < 3:
                fields["assignee"] = "tina"
            body = {
                "id": f"wo:gc{n}",
                "fields": fields,
                "checklist": [{"label": "Isolate"}, {"label": "Replace seal", "required": True}],
                "notes": "Leaking",
            }
            async with http.post(server.url + "/v1/work-orders", json=body) as response:
                assert response.status == 201, await response.text()
        async with http.put(
            server.url + "/v1/reference/assets",
            data=orjson.dumps({"id": "P-9", "name": "Feed pump"}),
            headers={
                "Authorization": f"Bearer {server.token('ada')}",
                "Content-Type": "application/x-ndjson",
            },
        ) as response:
            assert response.status == 200


def conforms(value: Any, hint: Any = None) -> None:
    """`value` is of the type `hint` says (its own class's annotations for an attrs or dataclass
    instance): what the generated models hold is what they declare, not merely cast to it."""
    if hint is None or hint is Any:
        if attrs.has(type(value)) or hasattr(type(value), "__dataclass_fields__"):
            module = sys.modules[type(value).__module__]
            models = sys.modules.get(PACKAGE + ".models")
            names = {**vars(module), **(vars(models) if models else {})}
            hints = typing.get_type_hints(type(value), globalns=names)
            for name, member in hints.items():
                if not name.startswith("_") and name != "additional_properties":
                    conforms(getattr(value, name), member)
        elif isinstance(value, list):
            for item in value:
                conforms(item)
        return
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                conforms(value, option)
                return
            except AssertionError as error:
                errors.append(str(error))
        raise AssertionError(f"{value!r} is none of {hint}: {errors}")
    if origin in (list, dict, tuple):
        assert isinstance(value, origin), (value, hint)
        args = typing.get_args(hint)
        if origin is list:
            for item in value:
                conforms(item, args[0])
        elif origin is dict:
            for key, item in value.items():
                conforms(key, args[0])
                conforms(item, args[1])
        else:
            for item, item_hint in zip(value, args, strict=True):
                conforms(item, item_hint)
        return
    if hint is type(None):
        assert value is None, (value, hint)
        return
    assert isinstance(value, hint), (value, hint)
    # bool is an int in Python, never in JSON Schema.
    assert not (hint is int and isinstance(value, bool)), (value, hint)
    conforms(value)
