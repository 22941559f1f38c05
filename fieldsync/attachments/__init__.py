"""Attachments: photos and signed documents, uploaded resumably, verified, stored once under
their sha256, and read by whoever may see a work order they belong to. Free of HTTP: the tus
and download endpoints in `fieldsync.api` are its faces. Its records persist through
`fieldsync.storage.AttachmentStore`; its bytes are files under `<data dir>/attachments/`."""

from fieldsync.attachments._attachments import (
    CHECKSUM_ALGORITHMS,
    Attachments,
    Checksum,
    Interrupted,
    attachment_hashes,
)
from fieldsync.attachments._blobs import Blobs, is_sha256
from fieldsync.storage import Attachment, Upload

__all__ = [
    "CHECKSUM_ALGORITHMS",
    "Attachment",
    "Attachments",
    "Blobs",
    "Checksum",
    "Interrupted",
    "Upload",
    "attachment_hashes",
    "is_sha256",
]
