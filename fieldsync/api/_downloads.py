"""Downloads of stored attachments, with byte ranges, and photo thumbnails for supervisors.

    GET /v1/attachments/{sha256}            the content; `Range` (RFC 9110 §14) for one range
    GET /v1/attachments/{sha256}/thumbnail  a JPEG at most 256 px on its longer side

Content never changes under its name, so its sha256 is a strong `ETag` (RFC 9110 §8.8.3) and
it may be cached privately for good. Content that does not exist and content the caller may not
see both answer 403 `forbidden`.
"""

from __future__ import annotations

import re

from aiohttp import hdrs, web

from fieldsync.api._permissions import PRINCIPAL
from fieldsync.api._problems import problem
from fieldsync.attachments import Attachments
from fieldsync.errors import ErrorCode, FieldsyncError

__all__ = ["ByteRange", "Downloads", "RangeNotSatisfiable", "byte_range"]

ATTACHMENT = "/v1/attachments/{sha256}"
THUMBNAIL = "/v1/attachments/{sha256}/thumbnail"

# Content-addressed: the same URL is the same bytes forever. `private`: each request is
# authorised, so no shared cache may answer for another user (RFC 9111 §5.2.2.7).
_CACHE = "private, max-age=31536000, immutable"
# Served content came from a device: a browser must not sniff it into something else nor run
# anything in it (a PDF's scripts, an SVG smuggled as a PNG).
_CONTENT_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "sandbox; default-src 'none'; img-src 'self'",
}

# RFC 9110 §14.1.2: int-range = first-pos "-" [ last-pos ], suffix-range = "-" suffix-length.
_INT_RANGE = re.compile(r"([0-9]{1,19})-([0-9]{1,19})?")
_SUFFIX_RANGE = re.compile(r"-([0-9]{1,19})")

ByteRange = tuple[int, int]  # first and last position, inclusive


class RangeNotSatisfiable(FieldsyncError):
    def __init__(self, size: int) -> None:
        super().__init__(
            ErrorCode.RANGE_NOT_SATISFIABLE, f"the content has {size} bytes", size=size
        )
        self.size = size


def byte_range(header: str | None, size: int) -> ByteRange | None:
    """The one range of `size` bytes that a `Range` header asks for, None to send everything.

    RFC 9110 §14.2: a Range with another unit, or not a valid ranges-specifier, is ignored;
    several ranges are too (a server MAY ignore Range; one range is what a resumed download or
    a media player asks for, and multipart/byteranges would cost more than the whole photo).
    Raises `RangeNotSatisfiable` when the one range lies outside the content (§14.1.1:
    a first-pos at or past the end, or a suffix of length 0)."""
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    spec = spec.strip()
    if (suffix := _SUFFIX_RANGE.fullmatch(spec)) is not None:
        length = int(suffix.group(1))
        if length == 0 or size == 0:
            raise RangeNotSatisfiable(size)
        return max(0, size - length), size - 1
    if (span := _INT_RANGE.fullmatch(spec)) is not None:
        first = int(span.group(1))
        last = int(span.group(2)) if span.group(2) is not None else None
        if last is not None and last < first:
            return None  # invalid (§14.1.2): ignored
        if first >= size:
            raise RangeNotSatisfiable(size)
        return first, size - 1 if last is None else min(last, size - 1)
    return None


def _etag_matches(header: str, etag: str) -> bool:
    """`If-None-Match`: weak comparison (RFC 9110 §13.1.2) against any listed tag, or `*`."""
    tags = [tag.strip() for tag in header.split(",")]
    return "*" in tags or any(tag.removeprefix("W/") == etag for tag in tags)


class Downloads:
    def __init__(self, attachments: Attachments) -> None:
        self._attachments = attachments

    def routes(self) -> list[web.RouteDef]:
        return [web.get(ATTACHMENT, self.content), web.get(THUMBNAIL, self.thumbnail)]

    async def content(self, request: web.Request) -> web.StreamResponse:
        sha256 = request.match_info["sha256"]
        try:
            found = await self._attachments.readable(request[PRINCIPAL], sha256)
        except FieldsyncError as error:
            return problem(error.code, error.message)
        etag = f'"{found.sha256}"'
        headers = {
            hdrs.ETAG: etag,
            hdrs.CACHE_CONTROL: _CACHE,
            hdrs.ACCEPT_RANGES: "bytes",
            **_CONTENT_HEADERS,
        }
        if_none_match = request.headers.get(hdrs.IF_NONE_MATCH)
        if if_none_match is not None and _etag_matches(if_none_match, etag):
            return web.Response(status=304, headers=headers)
        wanted = request.headers.get(hdrs.RANGE)
        # RFC 9110 §13.1.5: with If-Range, the range holds only for the representation it names
        # (a strong ETag compared strongly); otherwise the whole content is sent.
        if_range = request.headers.get(hdrs.IF_RANGE)
        if if_range is not None and if_range.strip() != etag:
            wanted = None
        try:
            span = byte_range(wanted, found.size)
        except RangeNotSatisfiable as error:
            # RFC 9110 §15.5.17: 416 names the current length in Content-Range.
            refused = problem(error.code, error.message, size=error.size)
            refused.headers.update({hdrs.CONTENT_RANGE: f"bytes */{found.size}", **headers})
            return refused
        start, last = span if span is not None else (0, found.size - 1)
        response = web.StreamResponse(status=206 if span is not None else 200, headers=headers)
        response.content_type = found.mime
        response.content_length = last - start + 1
        if span is not None:
            response.headers[hdrs.CONTENT_RANGE] = f"bytes {start}-{last}/{found.size}"
        await response.prepare(request)
        if request.method != hdrs.METH_HEAD:  # HEAD: the same headers, no content (§9.3.2)
            async for piece in self._attachments.read(found.sha256, start, last - start + 1):
                await response.write(piece)
        await response.write_eof()
        return response

    async def thumbnail(self, request: web.Request) -> web.Response:
        sha256 = request.match_info["sha256"]
        try:
            data = await self._attachments.thumbnail(request[PRINCIPAL], sha256)
        except FieldsyncError as error:
            return problem(error.code, error.message)
        etag = f'"{sha256}-thumbnail"'
        headers = {hdrs.ETAG: etag, hdrs.CACHE_CONTROL: _CACHE, **_CONTENT_HEADERS}
        if_none_match = request.headers.get(hdrs.IF_NONE_MATCH)
        if if_none_match is not None and _etag_matches(if_none_match, etag):
            return web.Response(status=304, headers=headers)
        return web.Response(body=data, content_type="image/jpeg", headers=headers)
