"""Log lines that say whose they are: the request or session, subject, device and document a
line concerns, from context variables the HTTP middleware and the replication sessions set,
and one JSON object a line for a log pipeline (`FIELDSYNC_LOG_FORMAT=json`).

Only identifiers go in the context, never a credential: a subject is the token's `sub`, not the
token. Context variables follow each request's and each WebSocket's task, and the callbacks
scheduled from it, so concurrent sessions never mix their fields.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson

__all__ = ["CONTEXT_FIELDS", "JsonFormatter", "bind", "configure", "context"]

CONTEXT_FIELDS = ("request", "session", "subject", "device", "doc")

_context: dict[str, ContextVar[str | None]] = {
    name: ContextVar(f"fieldsync_log_{name}", default=None) for name in CONTEXT_FIELDS
}


def bind(**fields: str | None) -> None:
    """Set context fields (`request`, `session`, `subject`, `device`, `doc`) for the current
    task and what it schedules from now on; None clears one."""
    for name, value in fields.items():
        _context[name].set(value)


def context() -> dict[str, str]:
    """The context fields that are set."""
    return {name: value for name, var in _context.items() if (value := var.get()) is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, the context fields,
    and the traceback as `exc` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **context(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def configure(level: str, format: str = "text") -> None:
    """The root logger at `level`, plain text for a terminal or JSON lines."""
    handler = logging.StreamHandler()
    if format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
