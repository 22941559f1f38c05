"""The HTTP contract (`openapi/fieldsync.yaml`) against the server, both ways:

- every route the application registers is in the document, every operation of the document is
  served, and each route's declared permission is the security the document states;
- every operation is driven against a running server with real requests, and each request and
  answer is validated by openapi-core against the (strict) document: a member whose type
  changes, one that appears undocumented or disappears, a status or an error code the document
  does not give, fail here;
- every example in the document is valid, the error vocabulary and its HTTP statuses are the
  document's, and the server serves the document and its reference page.

The property-based run is `test_contract_fuzz.py`, the generated client `test_contract_client.py`,
the WebSocket control messages `test_control_messages.py`.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import orjson
import pytest
from multidict import CIMultiDictProxy
from openapi_core import OpenAPI
from openapi_core.exceptions import OpenAPIError
from openapi_core.testing import MockRequest, MockResponse

from fieldsync.api import ROUTE_PERMISSIONS, Permission, load_spec
from fieldsync.api._problems import STATUS
from fieldsync.app import BACKEND, ENDPOINTS, create_app
from fieldsync.auth import DevIssuer
from fieldsync.config import Settings
from fieldsync.errors import ErrorCode
from fieldsync.records import Person
from tests import contract
from tests.api.test_middleware import parsed, upgrade_headers
from tests.api.test_uploads import bomb_png
from tests.auth.provider import CLIENT_ID, REDIRECT_URI, OpenIDProvider
from tests.auth.test_flows import PEOPLE, authorize
from tests.harness import Server, png, running_server
from tests.wire import connect

TUS = {"Tus-Resumable": "1.0.0"}


# --- the drift test, both ways ------------------------------------------------------------------


def registered_routes(tmp_path: Path) -> set[tuple[str, str]]:
    settings = Settings.load(environ={}, data_dir=str(tmp_path), oidc_issuer="http://127.0.0.1:1")
    app = create_app(settings)
    return {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource}


def test_every_route_is_in_the_document_and_every_operation_is_served(tmp_path: Path) -> None:
    registered = registered_routes(tmp_path)
    documented = {(method, path) for method, path, _ in contract.operations()}
    # aiohttp answers HEAD wherever it answers GET: HEAD is GET without a body (RFC 9110
    # §9.3.2), documented by the GET unless the document describes it on its own (tus).
    undocumented = {
        (method, path)
        for method, path in registered
        if (method, path) not in documented
        and not (method == "HEAD" and ("GET", path) in documented)
    }
    assert undocumented == set(), "routes the document does not describe"
    assert documented - registered == set(), "operations the server does not serve"


def test_who_may_call_is_the_same_in_the_document_and_the_server() -> None:
    spec = contract.strict_spec()
    default = spec["security"]
    for method, path, operation in contract.operations():
        declared = ROUTE_PERMISSIONS[("GET" if method == "HEAD" else method, path)]
        security = operation.get("security", default)
        anonymous = {} in security
        if declared is Permission.PUBLIC:
            assert security == [], (method, path)
        elif declared is Permission.IN_BAND:
            assert anonymous, (method, path)
            assert {"bearer": []} in security, (method, path)
        elif declared is Permission.SCRAPER:  # the static scrape token, not an OpenID one
            assert security == [{"scrape_token": []}], (method, path)
            assert "401" in operation["responses"], (method, path)
        else:  # a bearer token, checked before the handler
            assert security == [{"bearer": []}], (method, path)
            assert "401" in operation["responses"], (method, path)
        if declared in (Permission.OPERATOR, Permission.ADMIN):
            assert "403" in operation["responses"], (method, path)


def test_the_document_is_valid_openapi_3_1() -> None:
    from openapi_spec_validator import validate

    validate(contract.committed())
    validate(contract.strict_spec())


def test_every_example_is_valid() -> None:
    """Examples are part of the contract: an example that drifted from its schema misleads."""
    spec = contract.strict_spec()
    checked = 0

    def media_examples(content: Mapping[str, Any], where: str) -> None:
        nonlocal checked
        for media, body in content.items():
            if "example" in body and "schema" in body:
                errors = list(
                    contract.schema_validator(body["schema"]).iter_errors(body["example"])
                )
                assert errors == [], f"{where} {media}: {errors[0].message}"
                checked += 1

    for method, path, operation in contract.operations():
        where = f"{method} {path}"
        body = contract.resolve(operation.get("requestBody", {}))
        media_examples(body.get("content", {}), where)
        for status, response in operation["responses"].items():
            media_examples(contract.resolve(response).get("content", {}), f"{where} {status}")
        item = spec["paths"][path]
        for parameter in [*item.get("parameters", []), *operation.get("parameters", [])]:
            parameter = contract.resolve(parameter)
            if "example" in parameter:
                value = parameter["example"]
                if parameter["schema"].get("type") == "integer" and isinstance(value, str):
                    value = int(value)
                contract.schema_validator(parameter["schema"]).validate(value)
                checked += 1
    for name, schema in spec["components"]["schemas"].items():
        for value in schema.get("examples", []):
            contract.component(name).validate(value)
            checked += 1
    assert checked > 40


def test_the_error_vocabulary_and_its_statuses_are_the_documents() -> None:
    spec = contract.strict_spec()
    assert spec["components"]["schemas"]["ErrorCode"]["enum"] == [c.value for c in ErrorCode]
    documented = 0
    for method, path, operation in contract.operations():
        for status, response in operation["responses"].items():
            schema = (
                contract.resolve(response)
                .get("content", {})
                .get("application/problem+json", {})
                .get("schema")
            )
            if schema is None:
                continue
            code = schema.get("properties", {}).get("code", {})
            codes = code.get("enum") or [code["const"]]
            for value in codes:
                # What `problem()` sends for the code is the status the document gives it.
                assert STATUS.get(ErrorCode(value), 400) == int(status), (method, path, value)
                documented += 1
    assert documented > 60


# --- the document and its reference page, as served ----------------------------------------------


async def test_the_server_serves_the_document_and_its_reference_page(server: Server) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/v1/openapi.json") as response:
            assert response.status == 200
            served = await response.json()
        async with http.get(server.url + "/v1/docs") as response:
            assert response.status == 200
            assert response.content_type == "text/html"
            csp = response.headers["Content-Security-Policy"]
            page = await response.text()
    assert served == contract.committed() == load_spec()
    assert "default-src 'none'" in csp
    # Offline: no script, no stylesheet, image or font from anywhere.
    assert not re.search(r"<script|<link|<img|<iframe|@import|src=|url\(", page, re.IGNORECASE)
    for method, path, operation in contract.operations():
        assert f'id="op-{operation["operationId"]}"' in page, (method, path)
        assert f"<code>{path}</code>" in page
    for name in served["components"]["schemas"]:
        assert f'id="schema-{name}"' in page


# --- every operation, driven and validated -------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


class Contract:
    """Sends real requests to a server and holds each exchange to the document."""

    def __init__(self, server: Server[Any], http: aiohttp.ClientSession, api: OpenAPI) -> None:
        self.server = server
        self.http = http
        self.api = api
        self.exchanges: list[tuple[str, str, int]] = []
        self._templates = sorted(
            {path for _, path, _ in contract.operations()},
            key=lambda p: -len(re.sub(r"\{[^}]+\}", "", p)),
        )

    def token(self, subject: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.server.token(subject)}"}

    def template(self, path: str) -> str:
        for template in self._templates:
            pattern = re.escape(template).replace(r"\{", "{").replace(r"\}", "}")
            if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", pattern), path):
                return template
        raise AssertionError(f"{path} is in no path of the document")

    async def call(
        self,
        method: str,
        path: str,
        status: int,
        *,
        subject: str | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
        request_valid: bool | None = True,
    ) -> Answer:
        """The answer to one request, which must have `status`; the request must be valid per
        the document (or invalid, when `request_valid` is False) and the answer must be."""
        sent = {**(self.token(subject) if subject else {}), **(headers or {})}
        if content_type is not None:
            sent["Content-Type"] = content_type
        async with self.http.request(
            method, self.server.url + path, params=params, headers=sent, data=body
        ) as response:
            data = b"" if response.status == 101 else await response.read()
            answer = Answer(response.status, response.headers, data)
        assert answer.status == status, f"{method} {path}: {answer.status} {data[:300]!r}"
        request = MockRequest(
            self.server.url,
            method.lower(),
            path,
            args=dict(params or {}),
            headers=sent,
            data=body,
            content_type=content_type or "",
        )
        if request_valid is not None:
            try:
                self.api.validate_request(request)
                problem = None
            except OpenAPIError as error:
                problem = f"{error!r}: {error.__cause__!r}"
            assert (problem is None) is request_valid, f"{method} {path}: request: {problem}"
        mime = answer.headers.get("Content-Type", "").split(";")[0].strip()
        try:
            self.api.validate_response(
                request, MockResponse(data, status, dict(answer.headers), content_type=mime)
            )
        except OpenAPIError as error:
            raise AssertionError(
                f"{method} {path} -> {status}: the answer breaks the contract: {error!r}"
                f" {error.__cause__!r}\n{contract.dumps(_parsed(data))}"
            ) from None
        self.exchanges.append((method, self.template(path), status))
        return answer


def _parsed(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return data[:300]


def metadata(data: bytes, wo: str) -> str:
    pairs = {"sha256": hashlib.sha256(data).hexdigest(), "work_order": wo, "filename": "a.png"}
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in pairs.items())


METRICS_TOKEN = "contract-scrape-token"


@pytest.fixture
def server_settings() -> dict[str, Any]:
    return {"metrics_token": METRICS_TOKEN}


async def test_every_operation_answers_as_documented(
    server: Server, http: aiohttp.ClientSession
) -> None:
    c = Contract(server, http, contract.openapi())
    await _operations(c)
    await _work_orders(c)
    await _reference(c)
    await _screens(c)
    await _audit(c)
    await _teams(c)
    await _outbox(c)
    await _uploads_and_attachments(c)
    await _dashboard_acts(c)
    await _websockets(c)
    await _the_contract_itself(c)
    await _revalidation(c)
    await _draining(c)
    # Every answer the document gives, the server gave: the shared 401 and 426 of every
    # operation in `test_every_operation_answers_401_and_426_as_documented`, and the token
    # relay's success and outage against a provider that grants codes in the test after it.
    driven = {(m, p, str(status)) for m, p, status in c.exchanges}
    documented = {(m, p, s) for m, p, op in contract.operations() for s in op["responses"]}
    elsewhere = {(m, p, s) for m, p, s in documented if s in ("401", "426")}
    elsewhere |= {(m, "/v1/auth/token", s) for m, s in (("POST", "200"), ("POST", "503"))}
    elsewhere.add(("POST", "/v1/auth/token", "429"))  # with a tight limit, in its own test
    assert documented - driven - elsewhere == set()


async def _dashboard_acts(c: Contract) -> None:
    """Reassign and cancel, as a supervisor's dashboard does them, and their refusals."""
    json_type = "application/json"
    new = {"id": "wo:r1", "fields": {"title": "Reset breaker", "assignee": "tina"}}
    await c.call(
        "POST",
        "/v1/work-orders",
        201,
        subject="sam",
        body=orjson.dumps(new),
        content_type=json_type,
    )
    path = "/v1/work-orders/wo:r1"

    async def act(verb: str, status: int, subject: str, body: Any, **kwargs: Any) -> Answer:
        return await c.call(
            "POST",
            f"{path}/{verb}",
            status,
            subject=subject,
            body=None if body is None else orjson.dumps(body),
            content_type=None if body is None else json_type,
            **kwargs,
        )

    moved = await act("reassign", 200, "sam", {"assignee": "tom"})
    assert moved.json["fields"]["assignee"] == "tom"
    await act("reassign", 403, "tina", {"assignee": "tina"})  # no longer hers to see
    away = await act("reassign", 403, "sam", {"assignee": "ulla", "team": "south"})
    assert away.json["code"] == "forbidden_field"
    assert away.json["paths"]
    await act("reassign", 400, "sam", {}, request_valid=False)
    await act("reassign", 400, "sam", {"assignee": "tom", "why": "x"}, request_valid=None)
    await c.call(
        "POST",
        f"{path}/reassign",
        415,
        subject="sam",
        body=b"tom",
        content_type="text/plain",
        request_valid=False,
    )
    # A technician may not cancel: the status machine refuses it, as it would a device's entry.
    refused = await act("cancel", 409, "tom", None)
    assert refused.json["rule"] == "status_transition"
    await act("cancel", 403, "ulla", None)
    await act("cancel", 400, "sam", {"why": "no"}, request_valid=False)
    await c.call(
        "POST",
        f"{path}/cancel",
        415,
        subject="sam",
        body=b"now",
        content_type="text/plain",
        request_valid=False,
    )
    cancelled = await act("cancel", 200, "sam", None)
    assert cancelled.json["fields"]["status"] == "cancelled"


async def _operations(c: Contract) -> None:
    await c.call("GET", "/v1/health", 200)
    await c.call("GET", "/v1/ready", 200)
    await c.call("GET", "/v1/metrics", 200, subject="ada")
    await c.call("GET", "/v1/metrics", 401, request_valid=False)
    await c.call("GET", "/v1/metrics", 403, subject="tina")
    async with connect(c.server.sync_url, c.server.token("tina")) as wire:
        welcome = await wire.hello(platform="ios", version="2.5.0", device_id="pad-7")
        listed = await c.call("GET", "/v1/admin/sessions", 200, subject="ada")
        (session,) = [s for s in listed.json["items"] if s["id"] == welcome["session"]]
        assert (session["subject"], session["device"], session["platform"]) == (
            "tina",
            "pad-7",
            "ios",
        )
    await c.call("GET", "/v1/admin/sessions", 403, subject="mia")
    scrape = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    await c.call("GET", "/metrics", 200, headers=scrape)
    config = await c.call("GET", "/v1/auth/config", 200)
    assert config.json["token_endpoint"].endswith("/v1/auth/token")
    # The relay's refusals: a refresh token the development issuer never gave (sign in again),
    # a grant it does not relay.
    form = "application/x-www-form-urlencoded"
    refused = await c.call(
        "POST",
        "/v1/auth/token",
        401,
        body=b"grant_type=refresh_token&refresh_token=x",
        content_type=form,
    )
    assert refused.json["code"] == "reauthenticate"
    await c.call(
        "POST",
        "/v1/auth/token",
        400,
        body=b"grant_type=password",
        content_type=form,
        request_valid=False,
    )


async def _work_orders(c: Contract) -> None:
    fields = {
        "number": "C1",
        "title": "Replace pump seal",
        "assignee": "tina",
        "priority": "high",
        "asset_id": "P-1",
        "due_at": "2026-12-24T10:00:00+01:00",
    }
    new: dict[str, Any] = {
        "id": "wo:c1",
        "fields": fields,
        "checklist": [{"label": "Isolate the pump", "required": True}],
        "notes": "Seal leaking",
    }
    body = orjson.dumps(new)
    created = await c.call(
        "POST", "/v1/work-orders", 201, subject="sam", body=body, content_type="application/json"
    )
    assert created.headers["Location"] == "/v1/work-orders/wo:c1"
    for n in (2, 3):
        again = {**new, "id": f"wo:c{n}", "fields": {**fields, "number": f"C{n}"}}
        await c.call(
            "POST",
            "/v1/work-orders",
            201,
            subject="sam",
            body=orjson.dumps(again),
            content_type="application/json",
        )
    problem = await c.call(
        "POST", "/v1/work-orders", 409, subject="sam", body=body, content_type="application/json"
    )
    assert problem.json["location"] == "/v1/work-orders/wo:c1"
    invalid = orjson.dumps({"fields": {"title": "", "colour": "red"}})
    problem = await c.call(
        "POST",
        "/v1/work-orders",
        400,
        subject="sam",
        body=invalid,
        content_type="application/json",
        request_valid=False,
    )
    assert {e["path"] for e in problem.json["errors"]} >= {"fields.title", "fields.colour"}
    await c.call(
        "POST",
        "/v1/work-orders",
        415,
        subject="sam",
        body=b"title=x",
        content_type="text/plain",
        request_valid=False,
    )
    await c.call(
        "POST",
        "/v1/work-orders",
        403,
        subject="tina",
        body=orjson.dumps({"fields": {"title": "Mine"}}),
        content_type="application/json",
    )
    projection = await c.call("GET", "/v1/work-orders/wo:c1", 200, subject="tina")
    assert projection.json["fields"]["title"] == "Replace pump seal"
    await c.call("GET", "/v1/work-orders/wo:c1", 403, subject="ulla")
    await c.call("GET", "/v1/work-orders/wo:nothing", 403, subject="ada")
    await c.call(
        "GET",
        "/v1/work-orders/wo:c1",
        304,
        subject="tina",
        headers={"If-None-Match": projection.headers["ETag"]},
    )
    changes = await c.call("GET", "/v1/changes", 200, subject="tina", params={"since": "0"})
    assert [d["id"] for d in changes.json["docs"]] == ["wo:c1", "wo:c2", "wo:c3"]
    await c.call(
        "GET", "/v1/changes", 400, subject="tina", params={"since": "-1"}, request_valid=False
    )


async def _reference(c: Contract) -> None:
    rows = b'{"id": "P-1", "name": "Pump 1", "site": "North"}\n{"id": "P-2", "name": "Pump 2"}\n'
    ndjson = "application/x-ndjson"
    imported = await c.call(
        "PUT", "/v1/reference/assets", 200, subject="ada", body=rows, content_type=ndjson
    )
    assert imported.json["created"] == 2
    await c.call(
        "PATCH",
        "/v1/reference/assets",
        200,
        subject="ada",
        body=b'{"id": "P-2", "name": "Pump 2b"}',
        content_type=ndjson,
    )
    await c.call(
        "PATCH",
        "/v1/reference/assets",
        400,
        subject="ada",
        body=b"[1, 2]\n",
        content_type=ndjson,
        request_valid=False,
    )
    await c.call("PUT", "/v1/reference/assets", 403, subject="sam", body=rows, content_type=ndjson)
    await c.call(
        "PATCH", "/v1/reference/assets", 403, subject="tina", body=rows, content_type=ndjson
    )
    await c.call(
        "PUT",
        "/v1/reference/assets",
        400,
        subject="ada",
        body=rows,
        content_type="application/json",
        request_valid=False,
    )
    changes = await c.call(
        "GET",
        "/v1/reference/assets/changes",
        200,
        subject="tina",
        params={"since": "0", "limit": "10"},
    )
    assert {change["key"] for change in changes.json["changes"]} == {"P-1", "P-2"}
    await c.call("GET", "/v1/reference/secrets/changes", 403, subject="tina")
    gone = await c.call(
        "GET", "/v1/reference/assets/changes", 410, subject="tina", params={"since": str(10**15)}
    )
    assert gone.json["snapshot"] == "/v1/reference/assets/snapshot"
    snapshot = await c.call("GET", "/v1/reference/assets/snapshot", 200, subject="tina")
    assert len(contract.ndjson(snapshot.body)) == 3
    await c.call(
        "GET",
        "/v1/reference/assets/snapshot",
        304,
        subject="tina",
        headers={"If-None-Match": snapshot.headers["ETag"]},
    )


async def _screens(c: Contract) -> None:
    first = await c.call("GET", "/v1/screens/my-work", 200, subject="tina", params={"limit": "2"})
    assert [card["asset_name"] for card in first.json["items"]] == ["Pump 1", "Pump 1"]
    rest = await c.call(
        "GET", "/v1/screens/my-work", 200, subject="tina", params={"cursor": first.json["next"]}
    )
    assert rest.json == {
        "items": [first.json["items"][0] | {"id": "wo:c3", "number": "C3"}],
        "next": None,
    }
    await c.call(
        "GET",
        "/v1/screens/my-work",
        304,
        subject="tina",
        headers={"If-None-Match": rest.headers["ETag"]},
        params={"cursor": first.json["next"]},
    )
    await c.call(
        "GET",
        "/v1/screens/my-work",
        400,
        subject="tina",
        params={"limit": "0"},
        request_valid=False,
    )
    await c.call(
        "GET", "/v1/screens/my-work", 400, subject="sam", params={"cursor": first.json["next"]}
    )
    await c.call("GET", "/v1/screens/my-work", 401, request_valid=False)
    detail = await c.call("GET", "/v1/screens/work-order/wo:c1", 200, subject="tina")
    assert detail.json["asset"] == {"id": "P-1", "name": "Pump 1", "site": "North"}
    # The same content, the same validator: a document's maps are read in no stable order.
    for _ in range(5):
        await c.call(
            "GET",
            "/v1/screens/work-order/wo:c1",
            304,
            subject="tina",
            headers={"If-None-Match": detail.headers["ETag"]},
        )
    await c.call("GET", "/v1/screens/work-order/wo:c1", 403, subject="ulla")
    queue = await c.call(
        "GET",
        "/v1/screens/team-queue",
        200,
        subject="sam",
        params={"status": "assigned", "assignee": "tina"},
    )
    assert queue.json["counts"] == {"assigned": 3}
    await c.call(
        "GET",
        "/v1/screens/team-queue",
        400,
        subject="sam",
        params={"status": ""},
        request_valid=False,
    )
    await c.call("GET", "/v1/screens/team-queue", 403, subject="tina")
    metrics = await c.call("GET", "/v1/screens/region-metrics", 200, subject="mia")
    assert metrics.json["items"][0]["total"] == 3
    await c.call("GET", "/v1/screens/region-metrics", 403, subject="sam")


async def _audit(c: Contract) -> None:
    history = await c.call(
        "GET",
        "/v1/work-orders/wo:c1/history",
        200,
        subject="sam",
        params={"path": "fields.title", "limit": "5"},
    )
    assert history.json["items"][0]["new"] == "Replace pump seal"
    await c.call("GET", "/v1/work-orders/wo:c1/history", 403, subject="tina")
    await c.call(
        "GET",
        "/v1/work-orders/wo:c1/history",
        400,
        subject="sam",
        params={"cursor": "not-a-cursor"},
    )
    await c.call("GET", "/v1/conflicts", 200, subject="sam")
    await c.call("GET", "/v1/conflicts", 403, subject="tina")


async def _teams(c: Contract) -> None:
    # The directory table as the directory adapter (none runs here) would have written it.
    await c.server.app[BACKEND].directory.replace(
        [Person("tina", "Tina Tech", "tina@example.org", "north", "east", "sam")], 1.0
    )
    members = await c.call("GET", "/v1/teams/north/members", 200, subject="sam")
    assert [m["subject"] for m in members.json["items"]] == ["tina"]
    await c.call("GET", "/v1/teams/north/members", 403, subject="sue")


async def _outbox(c: Contract) -> None:
    # An outbound adapter no runner serves: the entry of the work order created next stays.
    c.server.app[BACKEND].outbox.route({"wo": ["contract"]})
    new = {"id": "wo:o1", "fields": {"number": "O1", "title": "Outbox", "assignee": "tina"}}
    await c.call(
        "POST",
        "/v1/work-orders",
        201,
        subject="sam",
        body=orjson.dumps(new),
        content_type="application/json",
    )
    listed = await c.call(
        "GET", "/v1/admin/outbox", 200, subject="ada", params={"adapter": "contract", "limit": "1"}
    )
    (entry,) = listed.json["items"]
    assert (entry["doc"], entry["state"]) == ("wo:o1", "pending")
    await c.call("GET", "/v1/admin/outbox", 403, subject="mia")
    await c.call(
        "GET", "/v1/admin/outbox", 400, subject="ada", params={"state": "lost"}, request_valid=False
    )
    etag = {"If-None-Match": listed.headers["ETag"]}
    params = {"adapter": "contract", "limit": "1"}
    await c.call("GET", "/v1/admin/outbox", 304, subject="ada", params=params, headers=etag)
    for action, state in (("skip", "skipped"), ("retry", "pending")):
        path = f"/v1/admin/outbox/{entry['id']}/{action}"
        answer = await c.call("POST", path, 200, subject="ada")
        assert answer.json["state"] == state
        await c.call("POST", path, 403, subject="sam")
        await c.call("POST", f"/v1/admin/outbox/999999/{action}", 404, subject="ada")


async def _uploads_and_attachments(c: Contract) -> None:
    await c.call("OPTIONS", "/v1/uploads", 204)
    photo = png(64, 48)
    sha = hashlib.sha256(photo).hexdigest()
    tus = {**TUS, "Upload-Length": str(len(photo)), "Upload-Metadata": metadata(photo, "wo:c1")}
    created = await c.call("POST", "/v1/uploads", 201, subject="tina", headers=tus)
    upload = created.headers["Location"]
    await c.call(
        "POST",
        "/v1/uploads",
        412,
        subject="tina",
        headers={"Upload-Length": "1", "Upload-Metadata": ""},
        request_valid=False,
    )
    await c.call("POST", "/v1/uploads", 403, subject="ulla", headers=tus)
    await c.call(
        "POST", "/v1/uploads", 413, subject="tina", headers={**tus, "Upload-Length": str(1 << 40)}
    )
    await c.call(
        "POST", "/v1/uploads", 400, subject="tina", headers={**tus, "Upload-Metadata": "sha256 !!"}
    )
    status = await c.call("GET", upload, 200, subject="tina", headers=TUS)
    assert status.json["complete"] is False
    await c.call("HEAD", upload, 200, subject="tina", headers=TUS)
    await c.call("GET", upload, 403, subject="tom", headers=TUS)
    chunk = "application/offset+octet-stream"
    at_zero = {**TUS, "Upload-Offset": "0"}
    await c.call(
        "PATCH",
        upload,
        400,
        subject="tina",
        body=photo[:10],
        content_type=chunk,
        headers=TUS,
        request_valid=False,
    )
    await c.call(
        "PATCH", upload, 403, subject="tom", body=photo[:10], content_type=chunk, headers=at_zero
    )
    await c.call(
        "PATCH",
        upload,
        412,
        subject="tina",
        body=photo[:10],
        content_type=chunk,
        headers={"Upload-Offset": "0"},
        request_valid=False,
    )
    await c.call(
        "PATCH",
        upload,
        413,
        subject="tina",
        body=photo + b"more",
        content_type=chunk,
        headers=at_zero,
    )
    empty = {**tus, "Upload-Length": "0"}
    await c.call("POST", "/v1/uploads", 415, subject="tina", headers=empty)
    conflict = await c.call(
        "PATCH",
        upload,
        409,
        subject="tina",
        body=photo[:10],
        headers={**TUS, "Upload-Offset": "5"},
        content_type=chunk,
    )
    assert conflict.json["offset"] == 0
    await c.call(
        "PATCH",
        upload,
        415,
        subject="tina",
        body=photo[:10],
        headers={**TUS, "Upload-Offset": "0"},
        content_type="image/png",
        request_valid=False,
    )
    wrong = f"sha256 {base64.b64encode(b'0' * 32).decode()}"
    await c.call(
        "PATCH",
        upload,
        460,
        subject="tina",
        body=photo[:100],
        content_type=chunk,
        headers={**TUS, "Upload-Offset": "0", "Upload-Checksum": wrong},
    )
    digest = base64.b64encode(hashlib.sha256(photo[:100]).digest()).decode()
    await c.call(
        "PATCH",
        upload,
        204,
        subject="tina",
        body=photo[:100],
        content_type=chunk,
        headers={**TUS, "Upload-Offset": "0", "Upload-Checksum": f"sha256 {digest}"},
    )
    done = await c.call(
        "PATCH",
        upload,
        204,
        subject="tina",
        body=photo[100:],
        headers={**TUS, "Upload-Offset": "100"},
        content_type=chunk,
    )
    assert done.headers["Upload-Offset"] == str(len(photo))
    again = await c.call("POST", "/v1/uploads", 201, subject="tina", headers=tus)
    assert again.headers["Upload-Offset"] == str(len(photo))  # stored: complete at creation
    await c.call("DELETE", again.headers["Location"], 204, subject="tina", headers=TUS)
    await c.call("DELETE", again.headers["Location"], 403, subject="tina", headers=TUS)
    # A bomb: few bytes, too many pixels.
    bomb = bomb_png(9000)
    bombing = {**TUS, "Upload-Length": str(len(bomb)), "Upload-Metadata": metadata(bomb, "wo:c1")}
    location = await c.call("POST", "/v1/uploads", 201, subject="tina", headers=bombing)
    await c.call(
        "PATCH",
        location.headers["Location"],
        422,
        subject="tina",
        body=bomb,
        headers={**TUS, "Upload-Offset": "0"},
        content_type=chunk,
    )
    # A PDF: stored, but it has no thumbnail. Sent slowly: meanwhile the upload is locked.
    pdf = b"%PDF-1.4\n% a signed form\n%%EOF\n"
    meta = {**TUS, "Upload-Length": str(len(pdf)), "Upload-Metadata": metadata(pdf, "wo:c1")}
    created = await c.call("POST", "/v1/uploads", 201, subject="tina", headers=meta)
    await _locked_while_written(c, created.headers["Location"], pdf)

    content = f"/v1/attachments/{sha}"
    whole = await c.call("GET", content, 200, subject="tina")
    assert whole.body == photo
    part = await c.call("GET", content, 206, subject="tina", headers={"Range": "bytes=10-19"})
    assert part.body == photo[10:20]
    await c.call("GET", content, 304, subject="tina", headers={"If-None-Match": f'"{sha}"'})
    await c.call("GET", content, 416, subject="tina", headers={"Range": f"bytes={len(photo)}-"})
    await c.call("GET", content, 403, subject="ulla")
    thumbnail = await c.call("GET", content + "/thumbnail", 200, subject="sam")
    assert thumbnail.body.startswith(b"\xff\xd8\xff")
    await c.call(
        "GET",
        content + "/thumbnail",
        304,
        subject="sam",
        headers={"If-None-Match": thumbnail.headers["ETag"]},
    )
    await c.call("GET", content + "/thumbnail", 403, subject="tina")
    pdf_sha = hashlib.sha256(pdf).hexdigest()
    await c.call("GET", f"/v1/attachments/{pdf_sha}/thumbnail", 404, subject="sam")
    detail = await c.call("GET", "/v1/screens/work-order/wo:c1", 200, subject="tina")
    assert detail.json["attachments"] == []  # uploaded, not yet referenced by the document


async def _locked_while_written(c: Contract, upload: str, data: bytes) -> None:
    """423 for another request on an upload while a PATCH writes it; then that PATCH's 204."""
    chunk = "application/offset+octet-stream"
    more = asyncio.Event()

    async def slowly() -> AsyncIterator[bytes]:
        yield data[:10]
        await more.wait()
        yield data[10:]

    async def write() -> aiohttp.ClientResponse:
        headers = {**c.token("tina"), **TUS, "Upload-Offset": "0", "Content-Type": chunk}
        async with c.http.patch(c.server.url + upload, data=slowly(), headers=headers) as answer:
            await answer.read()
            return answer

    writing = asyncio.create_task(write())
    try:
        # A PATCH at an offset that is not the upload's changes nothing: 409, until the upload
        # is held by the request writing it, then 423. (A probe that held it first made the
        # writer's request the 423: it is sent again.)
        probe = {**c.token("tina"), **TUS, "Upload-Offset": "999", "Content-Type": chunk}
        async with asyncio.timeout(10):
            while True:
                if writing.done():
                    assert writing.result().status == 423
                    writing = asyncio.create_task(write())
                async with c.http.patch(c.server.url + upload, data=b"x", headers=probe) as r:
                    if r.status == 423:
                        break
                    assert r.status == 409
                await asyncio.sleep(0.005)
        await c.call(
            "PATCH",
            upload,
            423,
            subject="tina",
            body=b"x",
            content_type=chunk,
            headers={**TUS, "Upload-Offset": "0"},
        )
        await c.call("DELETE", upload, 423, subject="tina", headers=TUS)
    finally:
        more.set()
        written = await writing
    assert written.status == 204
    assert written.headers["Upload-Offset"] == str(len(data))


async def _websockets(c: Contract) -> None:
    await c.call("GET", "/v1/sync", 101, subject="tina", headers=upgrade_headers())
    await c.call("GET", "/v1/sync", 400, subject="tina")
    token = c.server.token("sam")
    await c.call("GET", "/v1/yws/wo:c1", 101, params={"token": token}, headers=upgrade_headers())
    await c.call("GET", "/v1/yws/wo:c1", 400, params={"token": token})
    await c.call("GET", "/v1/sync", 403, headers=upgrade_headers(Origin="https://evil.example"))


async def _revalidation(c: Contract) -> None:
    """Every JSON answer with an ETag answers If-None-Match with 304, and the other errors of
    the lists."""
    for subject, path, params in [
        ("tina", "/v1/changes", {"since": "0"}),
        ("sam", "/v1/screens/team-queue", {"assignee": "tina"}),
        ("mia", "/v1/screens/region-metrics", {}),
        ("sam", "/v1/work-orders/wo:c1/history", {}),
        ("sam", "/v1/conflicts", {}),
        ("sam", "/v1/teams/north/members", {}),
        ("tina", "/v1/reference/assets/changes", {"since": "0"}),
    ]:
        first = await c.call("GET", path, 200, subject=subject, params=params)
        etag = {"If-None-Match": first.headers["ETag"]}
        await c.call("GET", path, 304, subject=subject, params=params, headers=etag)
        bad = {**params, "limit": "many"}
        await c.call("GET", path, 400, subject=subject, params=bad, request_valid=False)
    await c.call("GET", "/v1/reference/secrets/snapshot", 403, subject="tina")
    upload = "/v1/uploads/" + "0" * 32
    await c.call("HEAD", upload, 403, subject="tom", headers=TUS)
    for method in ("GET", "HEAD", "DELETE"):
        await c.call(method, upload, 412, subject="tom", request_valid=False)
    evil = upgrade_headers(Origin="https://evil.example")
    await c.call("GET", "/v1/yws/wo:c1", 403, params={"token": c.server.token("sam")}, headers=evil)


async def _draining(c: Contract) -> None:
    await c.server.app[ENDPOINTS].drain()
    await c.call("GET", "/v1/ready", 503)


async def _the_contract_itself(c: Contract) -> None:
    served = await c.call("GET", "/v1/openapi.json", 200)
    await c.call("GET", "/v1/openapi.json", 304, headers={"If-None-Match": served.headers["ETag"]})
    await c.call("GET", "/v1/docs", 200)
    # The dashboard's files (built by `make dashboard`, which `make test` runs first).
    page = await c.call("GET", "/dashboard/", 200)
    assert b'src="app.js"' in page.body
    await c.call("GET", "/dashboard/", 304, headers={"If-None-Match": page.headers["ETag"]})
    script = await c.call("GET", "/dashboard/app.js", 200)
    await c.call("GET", "/dashboard/app.js", 304, headers={"If-None-Match": script.headers["ETag"]})
    await c.call("GET", "/dashboard/secrets.env", 404)


async def test_the_token_relay_answers_as_documented(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Against a provider that grants codes: success, a refused grant, an outage."""
    async with (
        OpenIDProvider(PEOPLE) as idp,
        running_server(tmp_path, idp, oidc_client_id=CLIENT_ID) as server,
    ):
        c = Contract(server, http, contract.openapi())
        config = (await c.call("GET", "/v1/auth/config", 200)).json
        grant = await authorize(http, config, "tina")
        form = {
            "grant_type": "authorization_code",
            "code": grant.code,
            "code_verifier": grant.verifier,
            "redirect_uri": REDIRECT_URI,
            "client_id": CLIENT_ID,
        }
        encoded = "&".join(f"{k}={v}" for k, v in form.items()).encode()
        urlencoded = "application/x-www-form-urlencoded"
        tokens = await c.call("POST", "/v1/auth/token", 200, body=encoded, content_type=urlencoded)
        assert tokens.json["token_type"].lower() == "bearer"
        # The code again: the provider refuses the grant.
        refused = await c.call("POST", "/v1/auth/token", 401, body=encoded, content_type=urlencoded)
        assert refused.json["error"] == "invalid_grant"
        await idp.stop()
        refresh = f"grant_type=refresh_token&refresh_token={tokens.json['refresh_token']}"
        down = await c.call(
            "POST", "/v1/auth/token", 503, body=refresh.encode(), content_type=urlencoded
        )
        assert int(down.headers["Retry-After"]) > 0


async def test_the_token_relay_limits_each_address(
    tmp_path: Path, issuer: DevIssuer, http: aiohttp.ClientSession
) -> None:
    """Beyond the burst, a client address is told to slow down (documented as 429), and the
    request goes no further."""
    async with running_server(tmp_path, issuer, token_rate=0.01, token_burst=2) as server:
        c = Contract(server, http, contract.openapi())
        form = "application/x-www-form-urlencoded"
        body = b"grant_type=refresh_token&refresh_token=x"
        for _ in range(2):  # refused by the provider (it never gave that token), but relayed
            await c.call("POST", "/v1/auth/token", 401, body=body, content_type=form)
        limited = await c.call("POST", "/v1/auth/token", 429, body=body, content_type=form)
        assert limited.json["error"] == "slow_down"
        assert 1 <= int(limited.headers["Retry-After"]) <= 100


def concrete(path: str) -> str:
    """A path of the document with its parameters filled in."""
    return (
        path.replace("{doc_id}", "wo:c1")
        .replace("{dataset}", "assets")
        .replace("{upload_id}", "0" * 32)
        .replace("{sha256}", "0" * 64)
        .replace("{entry_id}", "1")
        .replace("{team}", "north")
    )


async def test_every_operation_answers_401_and_426_as_documented(
    tmp_path: Path, issuer: DevIssuer, http: aiohttp.ClientSession
) -> None:
    """The answers every operation shares: no token (where one is needed), and an old app."""
    minimums = parsed("min_client_versions", "ios=2.4.0")
    async with running_server(tmp_path, issuer, min_client_versions=minimums) as server:
        c = Contract(server, http, contract.openapi())
        old = {"X-Client-Platform": "ios", "X-Client-Version": "2.0.0"}
        for method, path, operation in contract.operations():
            upgrade = upgrade_headers() if path.startswith(("/v1/sync", "/v1/yws")) else {}
            await c.call(
                method, concrete(path), 426, headers={**old, **upgrade}, request_valid=None
            )
            if operation.get("security", [{"bearer": []}]) == [{"bearer": []}]:
                await c.call(method, concrete(path), 401, request_valid=False)
        await c.call("GET", "/v1/health", 200, headers={**old, "X-Client-Version": "2.4.0"})
    documented = {(m, p) for m, p, _ in contract.operations()}
    assert {(m, p) for m, p, status in c.exchanges if status == 426} == documented


# --- the validation has teeth -------------------------------------------------------------------


async def test_a_field_type_change_fails_validation(
    server: Server, http: aiohttp.ClientSession
) -> None:
    """The same real answer, held to a document where one member's type changed, fails; and an
    answer whose member changed type, or gained an undocumented one, fails the real document."""
    c = Contract(server, http, contract.openapi())
    await c.call(
        "POST",
        "/v1/work-orders",
        201,
        subject="sam",
        content_type="application/json",
        body=orjson.dumps({"fields": {"title": "T", "number": "7", "assignee": "tina"}}),
    )
    answer = await c.call("GET", "/v1/screens/my-work", 200, subject="tina")
    request = MockRequest(server.url, "get", "/v1/screens/my-work", headers=c.token("tina"))

    def fails(api: OpenAPI, body: Any) -> bool:
        response = MockResponse(orjson.dumps(body), 200, dict(answer.headers))
        try:
            api.validate_response(request, response)
        except OpenAPIError:
            return True
        return False

    body = answer.json
    assert not fails(c.api, body)
    changed = copy.deepcopy(contract.committed())
    changed["components"]["schemas"]["Card"]["properties"]["number"]["type"] = "integer"
    assert fails(contract.openapi(contract.strict(changed)), body)
    item = body["items"][0]
    assert fails(c.api, {**body, "items": [{**item, "number": 7}]})
    assert fails(c.api, {**body, "items": [{**item, "colour": "red"}]})
    assert fails(c.api, {**body, "items": [{k: v for k, v in item.items() if k != "site"}]})
    assert fails(c.api, {"items": body["items"]})


def test_strict_closes_described_objects_only() -> None:
    spec = {
        "components": {
            "schemas": {
                "A": {"type": "object", "properties": {"x": {"type": "string"}}},
                "B": {"type": "object", "additionalProperties": True},
                "C": {"$ref": "#/components/schemas/A", "properties": {"x": {"const": "y"}}},
            }
        },
        "paths": {},
    }
    closed = contract.strict(spec)["components"]["schemas"]
    assert closed["A"]["additionalProperties"] is False
    assert closed["B"]["additionalProperties"] is True
    assert "additionalProperties" not in closed["C"]
    with pytest.raises(jsonschema.ValidationError):
        contract.schema_validator(closed["A"]).validate({"x": "1", "y": 2})
