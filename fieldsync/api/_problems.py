"""RFC 9457 problem details: every HTTP error carries a stable `code` from the vocabulary in
`fieldsync.errors`."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from fieldsync.errors import ErrorCode

STATUS = {
    ErrorCode.TOKEN_EXPIRED: 401,
    ErrorCode.REAUTHENTICATE: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.FORBIDDEN_FIELD: 403,  # REST edits: the role may not write what the change writes
    ErrorCode.RULE_VIOLATION: 409,  # REST edits: a domain rule refused the change
    ErrorCode.ALREADY_EXISTS: 409,
    ErrorCode.OFFSET_MISMATCH: 409,
    ErrorCode.NO_THUMBNAIL: 404,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.TUS_VERSION_UNSUPPORTED: 412,
    ErrorCode.UPLOAD_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.RANGE_NOT_SATISFIABLE: 416,
    ErrorCode.IMAGE_TOO_LARGE: 422,
    ErrorCode.UPLOAD_LOCKED: 423,
    ErrorCode.CHECKSUM_MISMATCH: 460,  # tus 1.0 checksum extension: "460 Checksum Mismatch"
    ErrorCode.RESYNC_REQUIRED: 410,  # the history is gone; the snapshot is not
    ErrorCode.CLIENT_UPGRADE_REQUIRED: 426,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.DRAINING: 503,
    ErrorCode.IDP_UNAVAILABLE: 503,
    ErrorCode.STORAGE_UNAVAILABLE: 503,
}


def problem(code: ErrorCode, detail: str, **extra: Any) -> web.Response:
    status = STATUS.get(code, 400)
    body = {"type": "about:blank", "title": code.value, "status": status, "code": code.value}
    body["detail"] = detail
    body.update(extra)
    headers = {"WWW-Authenticate": f'Bearer error="{code.value}"'} if status == 401 else None
    return web.Response(
        body=orjson.dumps(body),
        status=status,
        content_type="application/problem+json",
        headers=headers,
    )
