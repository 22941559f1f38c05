"""The SQLite store's seam for the modules that keep tables of their own concerns beside the
documents (attachments, reference data): work on the writer thread inside a group commit, reads
in one snapshot. It hands out sqlite-utils objects, so it stays inside `storage`: what leaves
is each concern's own Protocol (`AttachmentStore`, `ReferenceStore`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

from sqlite_utils import Database

if TYPE_CHECKING:  # `_sqlite` imports the migrations, which import the tables' schemas
    from fieldsync.storage._sqlite import Transaction

__all__ = ["Tables"]

_T = TypeVar("_T")


@runtime_checkable
class Tables(Protocol):
    """A store that keeps tables of its own concerns beside the documents (`SQLiteStore`)."""

    def transact(self, work: Callable[[Transaction], _T]) -> Awaitable[_T]: ...

    async def query(self, read: Callable[[Database], _T]) -> _T: ...
