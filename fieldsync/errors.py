"""The error vocabulary: every code a client can act on, defined once for HTTP and WebSocket.

HTTP answers carry the code in an RFC 9457 problem document; WebSocket sessions send it in an
`error` control message (per document) or as the close reason (per connection).
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Any


class ErrorCode(StrEnum):
    # Per-connection (close reason and HTTP problem code).
    TOKEN_EXPIRED = "token_expired"  # refresh the access token and retry
    REAUTHENTICATE = "reauthenticate"  # token invalid or refresh rejected: sign in again
    FORBIDDEN = "forbidden"  # not allowed, or absent (the two look alike so ids cannot be probed)
    CLIENT_UPGRADE_REQUIRED = "client_upgrade_required"
    PROTOCOL_ERROR = "protocol_error"
    FRAME_TOO_LARGE = "frame_too_large"
    RATE_LIMITED = "rate_limited"
    # The token's subject already holds FIELDSYNC_MAX_SOCKETS_PER_SUBJECT WebSockets (close
    # 4429): close one (another tab, another device of the same user) before opening more.
    TOO_MANY_CONNECTIONS = "too_many_connections"
    AUTH_TIMEOUT = "auth_timeout"
    DRAINING = "draining"
    # The identity provider did not answer (down, timed out, 5xx) when fieldsync relayed a token
    # request (`POST /v1/auth/token`): HTTP 503 with Retry-After. The sign-in is not at fault;
    # the app keeps its refresh token and retries later, never asks the user to sign in again.
    IDP_UNAVAILABLE = "idp_unavailable"
    # REST (DESIGN.md §5): a query parameter or a request body the endpoint does not take
    # (HTTP 400; `errors` lists what is wrong), a pagination cursor that this server did not
    # make for this list and this caller (400: start again from the first page), and a document
    # created under an id that is already taken (409).
    INVALID_REQUEST = "invalid_request"
    INVALID_CURSOR = "invalid_cursor"
    ALREADY_EXISTS = "already_exists"
    # Attachments (tus 1.0 uploads, downloads; README "Attachments"). An upload larger than
    # `attachment_max_bytes` (413), content whose bytes are not an accepted type (415) or an
    # image of more pixels than `attachment_max_pixels` (422: a decompression bomb), a chunk or
    # a whole upload that does not match its checksum (460, tus 1.0 checksum extension), a PATCH
    # at an offset that is not the upload's (409: HEAD, then resume from there), an upload
    # another request is writing (423: retry), a client of another tus version (412), a `Range`
    # outside the content (416, RFC 9110 §15.5.17), a thumbnail asked of a non-image or of an
    # image too large to decode within `thumbnail_memory` (404: show the content's own icon).
    UPLOAD_TOO_LARGE = "upload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    IMAGE_TOO_LARGE = "image_too_large"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    OFFSET_MISMATCH = "offset_mismatch"
    UPLOAD_LOCKED = "upload_locked"
    TUS_VERSION_UNSUPPORTED = "tus_version_unsupported"
    RANGE_NOT_SATISFIABLE = "range_not_satisfiable"
    NO_THUMBNAIL = "no_thumbnail"
    # Reference data (README "Reference data"): the `since` asked for is older than the dataset's
    # retention horizon (its change history was compacted away) or newer than anything this
    # server committed (restored from a backup): HTTP 410 naming the `snapshot` to download, whose
    # `seq` the device then continues from with `changes?since=`.
    RESYNC_REQUIRED = "resync_required"
    # Operators (README "Adapters and the outbox"): what an admin route names by id, such as an
    # outbox entry, does not exist (404; purged, or never was).
    NOT_FOUND = "not_found"
    # Per-document (the `error` control message).
    RULE_VIOLATION = "rule_violation"  # the server corrected the merged state (a domain rule)
    # The update writes `paths` the role may not write, or that would leave the document outside
    # the writer's scope, or a creation the documents' creation rule refuses (README).
    FORBIDDEN_FIELD = "forbidden_field"
    INVALID_UPDATE = "invalid_update"
    INVALID_DOC_ID = "invalid_doc_id"
    DOC_TOO_LARGE = "doc_too_large"
    STORAGE_UNAVAILABLE = "storage_unavailable"


class CloseCode(IntEnum):
    """WebSocket close codes of `fieldsync.v1` (DESIGN.md §3)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 4400
    UNAUTHORIZED = 4401
    FORBIDDEN = 4403
    AUTH_TIMEOUT = 4408
    FRAME_TOO_LARGE = 4413
    UPGRADE_REQUIRED = 4426
    RATE_LIMITED = 4429
    DRAINING = 4503


class FieldsyncError(Exception):
    """An error with a stable code; `message` and `detail` are safe to show to the client."""

    def __init__(self, code: ErrorCode, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail


class ProtocolError(FieldsyncError):
    """The peer broke the wire protocol; the connection closes with 4400."""

    def __init__(self, message: str, close: CloseCode = CloseCode.PROTOCOL_ERROR) -> None:
        code = (
            ErrorCode.FRAME_TOO_LARGE
            if close is CloseCode.FRAME_TOO_LARGE
            else ErrorCode.PROTOCOL_ERROR
        )
        super().__init__(code, message)
        self.close = close


class AuthError(FieldsyncError):
    """A token was refused: `token_expired` or `reauthenticate` (HTTP 401, close 4401)."""
