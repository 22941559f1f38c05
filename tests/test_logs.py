"""Log lines that say whose they are (`FIELDSYNC_LOG_FORMAT=json`): the request, the session,
the subject, the device and the document, and never a token."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from fieldsync.logs import JsonFormatter, configure
from tests.harness import Server, work_order
from tests.wire import connect


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def where(self, **fields: Any) -> list[dict[str, Any]]:
        parsed = [orjson.loads(line) for line in self.lines]
        return [p for p in parsed if all(p.get(k) == v for k, v in fields.items())]


@pytest.fixture
def lines(caplog: pytest.LogCaptureFixture) -> Iterator[Lines]:
    caplog.set_level(logging.DEBUG)
    handler = Lines()
    logging.getLogger().addHandler(handler)
    try:
        yield handler
    finally:
        logging.getLogger().removeHandler(handler)


async def test_a_request_s_lines_carry_its_id_and_subject(server: Server, lines: Lines) -> None:
    token = server.token("tina")
    headers = {"Authorization": f"Bearer {token}", "X-Request-ID": "edge-4f2a"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(server.url + "/v1/metrics", headers=headers) as response,
    ):
        assert response.status == 403
    (line,) = lines.where(request="edge-4f2a", logger="aiohttp.access")
    assert "/v1/metrics" in line["message"]
    assert line["level"] == "INFO"
    assert line["subject"] == "tina"
    assert all(token not in text for text in lines.lines)


async def test_a_session_s_lines_carry_session_subject_device_and_document(
    server: Server, lines: Lines
) -> None:
    token = server.token("tina")
    async with connect(server.sync_url, token) as tina:
        welcome = await tina.hello(device_id="phone-9")
        # A technician may not create work orders: the refusal is logged, at DEBUG.
        await tina.update("wo:logged", work_order("wo:logged").get_update())
        await tina.control("error", code="forbidden")
    (refused,) = lines.where(doc="wo:logged", device="phone-9")
    assert refused["session"] == welcome["session"]
    assert refused["subject"] == "tina"
    assert refused["message"].startswith("refused: forbidden")
    assert refused["request"]  # the upgrade request's id, on every line of its socket
    assert all(token not in text for text in lines.lines)


def test_the_format_is_chosen_by_the_setting(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure("INFO", "json")
        logging.getLogger("fieldsync.test").info("hello %s", "world")
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert orjson.loads(err)["message"] == "hello world"
        configure("INFO", "text")
        logging.getLogger("fieldsync.test").info("plain")
        assert capsys.readouterr().err.strip().endswith("INFO fieldsync.test: plain")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
