"""Resumable uploads over tus 1.0.0 (https://tus.io/protocols/resumable-upload): core, creation,
checksum and termination, under `/v1/uploads`; the HTTP face of `Attachments`.

    OPTIONS /v1/uploads          what this server speaks (no token needed)
    POST    /v1/uploads          create: Upload-Length, Upload-Metadata (sha256, work_order;
                                 filename and filetype are kept but never trusted)
    HEAD    /v1/uploads/{id}     the offset to resume from (GET: the same as JSON)
    PATCH   /v1/uploads/{id}     application/offset+octet-stream at Upload-Offset, with an
                                 optional Upload-Checksum
    DELETE  /v1/uploads/{id}     termination

Every answer but OPTIONS's carries `Tus-Resumable`, errors included (RFC 9457 problem
documents with fieldsync's codes); a request without `Tus-Resumable: 1.0.0` gets 412 with
`Tus-Version`. Upload resources are the creator's alone: another principal's, or one that does
not exist, answers 403 alike (tus 1.0 allows 403 for "not found").
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from fieldsync.api._permissions import PRINCIPAL
from fieldsync.api._problems import problem
from fieldsync.attachments import (
    CHECKSUM_ALGORITHMS,
    Attachments,
    Checksum,
    Interrupted,
    Upload,
    is_sha256,
)
from fieldsync.errors import ErrorCode, FieldsyncError

__all__ = ["TUS_VERSION", "TusEndpoints"]

UPLOADS = "/v1/uploads"
UPLOAD = "/v1/uploads/{upload_id}"
TUS_VERSION = "1.0.0"
EXTENSIONS = "creation,checksum,termination"
_OFFSET_STREAM = "application/offset+octet-stream"  # tus 1.0 core, PATCH

# RFC 9110 §5.5: a header value is visible ASCII and spaces; these stay far below aiohttp's own
# 8 KiB limit for a header line.
_MAX_METADATA = 4096
_DIGITS = re.compile(r"[0-9]{1,19}")  # a non-negative 64-bit integer, as tus offsets are
_METADATA_KEY = re.compile(r"[!-+\--~]{1,64}")  # visible ASCII but the comma

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _BadRequest(FieldsyncError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.INVALID_REQUEST, message)


class TusEndpoints:
    def __init__(self, attachments: Attachments, *, public_url: str = "") -> None:
        self._attachments = attachments
        self._public_url = public_url.rstrip("/")

    def routes(self) -> list[web.RouteDef]:
        return [
            web.route("OPTIONS", UPLOADS, self.options),
            web.post(UPLOADS, _tus(self.create)),
            # GET registers HEAD too: tus asks HEAD for the offset; GET says the same in JSON.
            web.get(UPLOAD, _tus(self.status)),
            web.patch(UPLOAD, _tus(self.patch)),
            web.delete(UPLOAD, _tus(self.terminate)),
        ]

    async def options(self, request: web.Request) -> web.Response:
        """tus 1.0 core §OPTIONS: the versions, extensions and limits, asked before any token."""
        return web.Response(
            status=204,
            headers={
                "Tus-Resumable": TUS_VERSION,
                "Tus-Version": TUS_VERSION,
                "Tus-Extension": EXTENSIONS,
                "Tus-Max-Size": str(self._attachments.max_bytes),
                "Tus-Checksum-Algorithm": ",".join(CHECKSUM_ALGORITHMS),
            },
        )

    async def create(self, request: web.Request) -> web.Response:
        """tus 1.0 creation: 201 with the upload's `Location`; complete already (Upload-Offset
        equal to Upload-Length) when the content is stored and the sender may read it."""
        if "Upload-Defer-Length" in request.headers:
            raise _BadRequest("Upload-Defer-Length is not supported: send Upload-Length")
        length = _number(request.headers.get("Upload-Length"), "Upload-Length")
        raw = request.headers.get("Upload-Metadata", "")
        metadata = _metadata(raw)
        sha256 = metadata.get("sha256", "").strip().lower()
        if not is_sha256(sha256):
            raise _BadRequest("Upload-Metadata must carry sha256: the content's sha256 in hex")
        wo = metadata.get("work_order", "").strip()
        if not wo:
            raise _BadRequest("Upload-Metadata must carry work_order: the work order's id")
        created = await self._attachments.create(request[PRINCIPAL], wo, sha256, length, raw)
        headers = {"Location": f"{self._public_url}{UPLOADS}/{created.id}"}
        if created.complete:
            headers["Upload-Offset"] = str(created.received)
        return web.Response(status=201, headers=headers)

    async def status(self, request: web.Request) -> web.Response:
        """tus 1.0 core §HEAD: the offset to resume from. Never cached: it moves."""
        current = await self._attachments.upload(
            request[PRINCIPAL], request.match_info["upload_id"]
        )
        return web.json_response(_describe(current), headers=_offset_headers(current, True))

    async def patch(self, request: web.Request) -> web.Response:
        """tus 1.0 core §PATCH: the body appended at Upload-Offset; 204 with the new offset."""
        if request.content_type != _OFFSET_STREAM:
            raise FieldsyncError(
                ErrorCode.UNSUPPORTED_MEDIA_TYPE, f"PATCH bodies are {_OFFSET_STREAM}"
            )
        offset = _number(request.headers.get("Upload-Offset"), "Upload-Offset")
        checksum = _checksum(request.headers.get("Upload-Checksum"))
        try:
            current = await self._attachments.receive(
                request[PRINCIPAL],
                request.match_info["upload_id"],
                offset,
                _body(request),
                expected=request.content_length,
                checksum=checksum,
            )
        except Interrupted as cut:
            # Nobody reads this answer; the device will ask HEAD where to resume.
            raise _BadRequest(f"the request body ended early: {cut}") from None
        return web.Response(status=204, headers=_offset_headers(current, False))

    async def terminate(self, request: web.Request) -> web.Response:
        """tus 1.0 termination: 204, and the upload is gone."""
        await self._attachments.terminate(request[PRINCIPAL], request.match_info["upload_id"])
        return web.Response(status=204)


def _tus(handler: Handler) -> Handler:
    """The tus frame around a handler: the version check, `Tus-Resumable` on every answer, and
    errors as problem documents."""

    async def with_tus(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Tus-Resumable") != TUS_VERSION:
            # tus 1.0 core: 412 Precondition Failed, naming the versions the server speaks.
            response: web.StreamResponse = problem(
                ErrorCode.TUS_VERSION_UNSUPPORTED,
                f"send Tus-Resumable: {TUS_VERSION}",
                supported=[TUS_VERSION],
            )
            response.headers["Tus-Version"] = TUS_VERSION
        else:
            try:
                response = await handler(request)
            except FieldsyncError as error:
                response = problem(error.code, error.message, **error.detail)
                if error.code is ErrorCode.CHECKSUM_MISMATCH:
                    response.set_status(460, "Checksum Mismatch")  # tus 1.0 checksum extension
        response.headers["Tus-Resumable"] = TUS_VERSION
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    return with_tus


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    """The request body as it arrives; a connection lost on the way is `Interrupted`."""
    try:
        async for data in request.content.iter_any():
            yield data
    except (aiohttp.ClientPayloadError, HttpProcessingError, ConnectionError) as lost:
        raise Interrupted(type(lost).__name__) from lost


def _offset_headers(current: Upload, with_length: bool) -> dict[str, str]:
    headers = {"Upload-Offset": str(current.received)}
    if with_length:
        headers["Upload-Length"] = str(current.length)
        if current.metadata:
            headers["Upload-Metadata"] = current.metadata
    return headers


def _describe(current: Upload) -> dict[str, object]:
    return {
        "id": current.id,
        "work_order": current.wo,
        "sha256": current.sha256,
        "offset": current.received,
        "length": current.length,
        "complete": current.complete,
        "attachment": f"/v1/attachments/{current.sha256}" if current.complete else None,
    }


def _number(value: str | None, header: str) -> int:
    if value is None or not _DIGITS.fullmatch(value.strip()):
        raise _BadRequest(f"{header} must be a non-negative integer")
    return int(value)


def _metadata(header: str) -> dict[str, str]:
    """tus 1.0 creation: `key base64value` pairs, comma-separated; keys unique, values
    optional. Values are decoded as UTF-8 text."""
    if len(header) > _MAX_METADATA:
        raise _BadRequest(f"Upload-Metadata is longer than {_MAX_METADATA} characters")
    pairs: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in header.split(","))):
        key, _, encoded = item.partition(" ")
        if not _METADATA_KEY.fullmatch(key) or key in pairs:
            raise _BadRequest("Upload-Metadata keys must be unique, without spaces or commas")
        try:
            pairs[key] = base64.b64decode(encoded.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise _BadRequest(f"Upload-Metadata {key[:32]!r} is not base64 of UTF-8") from None
    return pairs


def _checksum(header: str | None) -> Checksum | None:
    """tus 1.0 checksum: `Upload-Checksum: <algorithm> <base64 digest>`; an algorithm the
    server does not support is a 400."""
    if header is None:
        return None
    algorithm, _, encoded = header.strip().partition(" ")
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise _BadRequest(f"Upload-Checksum algorithms: {', '.join(CHECKSUM_ALGORITHMS)}")
    try:
        return Checksum(algorithm, base64.b64decode(encoded.strip(), validate=True))
    except binascii.Error:
        raise _BadRequest("Upload-Checksum's digest is not base64") from None
