"""The HTTP API: operator endpoints and RFC 9457 problem responses."""

from fieldsync.api._operations import Operations
from fieldsync.api._problems import problem

__all__ = ["Operations", "problem"]
