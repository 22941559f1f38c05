"""Page sizes and opaque pagination cursors for the REST lists (DESIGN.md §5).

A cursor is the keyset position a page ended at (its last sort key and document id), so the next
page starts exactly after it however many work orders were inserted meanwhile, without OFFSET
(which would shift under inserts and cost a scan of every skipped row).

It is opaque to clients and authenticated: base64url of the position's JSON and a keyed BLAKE2b
tag (RFC 7693) over it and what it was made for (the list, the caller, the list's filters), with
a key the database keeps, so every node that shares the database honours it. A cursor edited,
truncated, or carried to another list, filter or user is refused with 400 `invalid_cursor`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Awaitable, Callable, Sequence

import orjson
from aiohttp import web

from fieldsync.errors import ErrorCode, FieldsyncError

__all__ = ["DEFAULT_PAGE", "MAX_PAGE", "Cursors", "page_size"]

# A phone screen shows a dozen cards; 50 fills a few scrolls in one round trip. The hard maximum
# bounds what one request may make the server read and send.
DEFAULT_PAGE = 50
MAX_PAGE = 200

_VERSION = 1
_TAG_BYTES = 16
_MAX_CURSOR = 1024  # characters: a position is two short strings


def page_size(request: web.Request, default: int = DEFAULT_PAGE, maximum: int = MAX_PAGE) -> int:
    """The `limit` query parameter: `default` when absent, at most `maximum` (a request for more
    gets the maximum, never everything); anything but a positive integer is a 400."""
    raw = request.query.get("limit")
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        raise FieldsyncError(ErrorCode.INVALID_REQUEST, "limit must be a positive integer")
    return min(int(raw), maximum)


class Cursors:
    """Makes and reads the cursors of one server; `key` gives the database's cursor key."""

    def __init__(self, key: Callable[[], Awaitable[bytes]]) -> None:
        self._key = key

    async def make(self, binding: Sequence[str | None], position: Sequence[str]) -> str:
        """The cursor for `position` in the list named by `binding` (the list, the caller and
        every filter that shapes it)."""
        payload = orjson.dumps([_VERSION, list(position)])
        tag = await self._tag(binding, payload)
        return base64.urlsafe_b64encode(payload + tag).rstrip(b"=").decode()

    async def read(
        self, request: web.Request, binding: Sequence[str | None], arity: int
    ) -> tuple[str, ...] | None:
        """The position in the request's `cursor` parameter (None when absent: the first page),
        a tuple of `arity` strings. Raises `invalid_cursor` for anything this server did not
        make for this binding."""
        raw = request.query.get("cursor")
        if raw is None:
            return None
        if len(raw) > _MAX_CURSOR or not raw.isascii():
            raise _invalid()
        try:
            data = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        except (binascii.Error, ValueError):
            raise _invalid() from None
        payload, tag = data[:-_TAG_BYTES], data[-_TAG_BYTES:]
        if len(data) <= _TAG_BYTES or not hmac.compare_digest(
            tag, await self._tag(binding, payload)
        ):
            raise _invalid()
        # Authentic, so written by `make`; checked anyway, as a key could outlive a format.
        try:
            version, position = orjson.loads(payload)
        except (orjson.JSONDecodeError, TypeError, ValueError):
            raise _invalid() from None
        if (
            version != _VERSION
            or not isinstance(position, list)
            or len(position) != arity
            or not all(isinstance(part, str) for part in position)
        ):
            raise _invalid()
        return tuple(position)

    async def _tag(self, binding: Sequence[str | None], payload: bytes) -> bytes:
        mac = hashlib.blake2b(
            key=await self._key(), digest_size=_TAG_BYTES, person=b"fieldsync.cursor"
        )
        # Length-prefixed, so no two bindings share an encoding; None differs from "".
        for part in binding:
            encoded = b"\xff" if part is None else part.encode()
            mac.update(len(encoded).to_bytes(4, "big") + encoded)
        mac.update(payload)
        return mac.digest()


def _invalid() -> FieldsyncError:
    return FieldsyncError(
        ErrorCode.INVALID_CURSOR,
        "this cursor was not made for this list: ask for the first page again",
    )
