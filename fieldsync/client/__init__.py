"""A Python client for `fieldsync.v1`: offline documents in a local SQLite file, edits queued
until the server acknowledges them durably, reconnect with jittered backoff."""

from fieldsync.client._client import Backoff, Client, Fatal, Traffic
from fieldsync.client._local import LocalStore
from fieldsync.client._reference import ReferenceReplica, ReferenceSync

__all__ = [
    "Backoff",
    "Client",
    "Fatal",
    "LocalStore",
    "ReferenceReplica",
    "ReferenceSync",
    "Traffic",
]
