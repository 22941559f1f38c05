"""Durable storage of documents behind one small protocol; SQLite is the embedded default."""

from fieldsync.storage._sqlite import SQLiteStore, StorageError, Transaction
from fieldsync.storage._types import (
    ChangedDoc,
    ChangesPage,
    Committed,
    DeviceSeen,
    DocIndex,
    ScopeChange,
    ScopeFilter,
    ScopeKind,
    Store,
    StoredDoc,
    Write,
)

__all__ = [
    "ChangedDoc",
    "ChangesPage",
    "Committed",
    "DeviceSeen",
    "DocIndex",
    "SQLiteStore",
    "ScopeChange",
    "ScopeFilter",
    "ScopeKind",
    "StorageError",
    "Store",
    "StoredDoc",
    "Transaction",
    "Write",
]
