"""Document ids carry their type: `wo:<id>` for a work order, `form:<id>` for a form."""

from __future__ import annotations

import re
from enum import StrEnum

from fieldsync.errors import ErrorCode, FieldsyncError

MAX_DOC_ID = 80
_DOC_ID = re.compile(r"(wo|form):[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class DocType(StrEnum):
    WORK_ORDER = "wo"
    FORM = "form"


class InvalidDocId(FieldsyncError):
    def __init__(self, doc_id: str) -> None:
        shown = doc_id[:MAX_DOC_ID] + ("…" if len(doc_id) > MAX_DOC_ID else "")
        super().__init__(
            ErrorCode.INVALID_DOC_ID,
            f"invalid document id {shown!r}: expected wo:<id> or form:<id>, "
            "<id> of 1-64 letters, digits, '.', '_' or '-'",
        )


def doc_type(doc_id: str) -> DocType:
    """The type named by a document id; raises `InvalidDocId` for anything malformed."""
    if len(doc_id) > MAX_DOC_ID or not _DOC_ID.fullmatch(doc_id):
        raise InvalidDocId(doc_id)
    return DocType(doc_id.split(":", 1)[0])
