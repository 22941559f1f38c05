"""Secrets out of aiohttp's log lines.

fieldsync's own code never logs a token (`tests/test_secrets_in_logs.py` proves it, and the
access log drops query strings), but aiohttp's server logs a request it cannot parse together
with its raw request line, at ERROR. A browser's y-websocket token travels in the query string
(`?token=`, the only place a browser can put it), so one malformed request would write a live
token to the error log. This filter sits on the loggers aiohttp writes to and rewrites such
records before any handler formats them.
"""

from __future__ import annotations

import logging
import re

__all__ = ["RedactSecrets", "redact", "redact_aiohttp_logs"]

# Query or form parameters that carry credentials (RFC 6749 §4.1-§6, RFC 7636 §4.5, and the
# y-websocket `token`), bearer credentials (RFC 6750 §2.1), and any JWS compact serialisation.
_PARAMETER = re.compile(
    r"(?i)\b((?:access_|refresh_|id_)?token|code(?:_verifier)?|password|client_secret)=[^&\s'\"]+"
)
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9\-._~+/]+=*")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\.?[A-Za-z0-9_-]*")

REDACTED = "[redacted]"

# aiohttp's loggers (`aiohttp.log`). A filter on a logger applies to the records logged to it,
# not to those of its children, so each is named.
AIOHTTP_LOGGERS = (
    "aiohttp.access",
    "aiohttp.client",
    "aiohttp.internal",
    "aiohttp.server",
    "aiohttp.web",
    "aiohttp.websocket",
)


def redact(text: str) -> str:
    text = _PARAMETER.sub(rf"\1={REDACTED}", text)
    text = _BEARER.sub(rf"\1{REDACTED}", text)
    return _JWT.sub(REDACTED, text)


class RedactSecrets(logging.Filter):
    """Rewrites a record's message, traceback and stack with the credentials replaced."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info:
            # The traceback as text, redacted; the exception object itself would let a
            # handler format its message (the raw request line) again.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def redact_aiohttp_logs() -> None:
    """Attach the filter to aiohttp's loggers, once per process."""
    for name in AIOHTTP_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())
