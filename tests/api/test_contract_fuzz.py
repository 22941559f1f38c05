"""A property-based run of the live server from its contract (schemathesis): for every operation
of `openapi/fieldsync.yaml`, requests generated from the document (valid ones, then ones that
break it) are sent to a running server with an admin's and with a supervisor's token, and every
answer must be no 5xx, a documented status with a documented content type, headers and body
(the strict document, `tests/contract.py`), and an invalid request must be refused.

Bounded for CI: a few examples per operation and mode, no shrinking; a failure prints the
operation, the check and the request that broke it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests import contract
from tests.harness import Server

# About two minutes a principal on the development machine: twice that is still no hang.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# Examples per operation and generation mode: ~30 operations, 2 modes, 2 principals.
EXAMPLES = 25
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


# What refusing an invalid request looks like here: the usual 4xx, and tus 1.0's own (412 for a
# missing or other `Tus-Resumable`, 460 for a checksum), and 426 for an old app.
CONFIG = schemathesis.Config.from_dict(
    {
        # What the document does not describe is not sent: no extra query parameters (the
        # server ignores those, as HTTP servers do), no generated credentials (each run sends
        # its principal's token).
        "generation": {"allow-extra-parameters": False, "with-security-parameters": False},
        "checks": {
            "negative_data_rejection": {
                "expected-statuses": [400, 401, 403, 404, 409, 412, 413, 415, 416, 422, 426, 460]
            }
        },
    }
)


@schemathesis.serializer("application/x-ndjson")
def _json_lines(ctx: Any, value: Any) -> bytes:
    rows = value if isinstance(value, list) else [value]
    # json, not orjson: generated rows may hold integers beyond 64 bits (the server refuses them)
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


schemathesis.serializer.alias("application/offset+octet-stream", "application/octet-stream")


@schemathesis.deserializer("application/x-ndjson")
def _read_json_lines(ctx: Any, response: Any) -> list[Any]:
    return contract.ndjson(response.content)


def fuzz(base_url: str, headers: Mapping[str, str]) -> list[str]:
    """Every operation, positive then negative; the failures found (one per operation and mode)."""
    schema = schemathesis.openapi.from_dict(contract.strict_spec(), config=CONFIG)
    failures: list[str] = []
    with requests.Session() as session:
        for result in schema.get_all_operations():
            if not isinstance(result, Ok):
                failures.append(f"schemathesis cannot read an operation: {result.err()}")
                continue
            operation = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                checks = CHECKS if mode.is_positive else [*CHECKS, negative_data_rejection]
                run = _test(operation, mode, session, base_url, headers, checks)
                try:
                    run()
                except Unsatisfiable:
                    assert not mode.is_positive, operation.label  # nothing there to break
                except (Exception, BaseExceptionGroup) as failure:
                    failures.append(f"{operation.label} ({mode.value}): {failure}"[:1500])
    return failures


def _test(
    operation: Any,
    mode: GenerationMode,
    session: requests.Session,
    base_url: str,
    headers: Mapping[str, str],
    checks: list[Any],
) -> Callable[[], None]:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        response = case.call(base_url=base_url, session=session, headers=dict(headers), timeout=10)
        if _refused_by_the_http_layer(response):
            return  # the document says so (info.description); no route saw the request
        case.validate_response(response, checks=checks, headers=dict(headers))

    return run


# aiohttp's request parser refuses a request line or header field over 8190 bytes, in plain text
# and before any route: an invalid value of a few hundred characters, percent-encoded, gets there.
_LINE_LIMIT = 8190


def _refused_by_the_http_layer(response: Any) -> bool:
    request = response.request
    too_long = len(request.url) > _LINE_LIMIT or any(
        len(f"{name}: {value}") > _LINE_LIMIT for name, value in request.headers.items()
    )
    return too_long and response.status_code == 400


async def seed(server: Server) -> None:
    """A few work orders and an asset, so that the happy paths have something to show."""
    import aiohttp

    async with aiohttp.ClientSession() as http:
        for n in range(3):
            body = {
                "id": f"wo:fz{n}",
                "fields": {"title": f"Pump {n}", "assignee": "tina", "asset_id": "P-1"},
                "checklist": [{"label": "Check", "required": True}],
            }
            async with http.post(
                server.url + "/v1/work-orders",
                json=body,
                headers={"Authorization": f"Bearer {server.token('sam')}"},
            ) as response:
                assert response.status == 201
        async with http.put(
            server.url + "/v1/reference/assets",
            data=b'{"id": "P-1", "name": "Pump 1"}\n',
            headers={
                "Authorization": f"Bearer {server.token('ada')}",
                "Content-Type": "application/x-ndjson",
            },
        ) as response:
            assert response.status == 200


@pytest.mark.parametrize("subject", ["ada", "sam"])
async def test_the_live_server_holds_to_its_contract(server: Server, subject: str) -> None:
    await seed(server)
    headers = {"Authorization": f"Bearer {server.token(subject)}"}
    failures = await asyncio.to_thread(fuzz, server.url, headers)
    assert failures == [], "\n\n".join(failures)
