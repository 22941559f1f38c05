"""Adapters: the outbox that takes committed changes to outbound systems (ERP, relational
projections), and inbound adapters that write documents through the device write path."""

from fieldsync.adapters._base import (
    Adapter,
    AdapterConfigError,
    Delivery,
    DeliveryError,
    DirectoryAdapter,
    DocumentWriter,
    Health,
    HealthState,
    OutboundAdapter,
    ReferenceImporter,
)
from fieldsync.adapters._config import (
    DEFAULT_MAX_ATTEMPTS,
    KINDS,
    AdapterContext,
    Factory,
    Table,
    build_adapter,
    build_adapters,
    factory_of,
    read_file,
    redact_url,
    register_kind,
)
from fieldsync.adapters._lifecycle import Adapters
from fieldsync.adapters._runner import Backoff, OutboxRunner

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "KINDS",
    "Adapter",
    "AdapterConfigError",
    "AdapterContext",
    "Adapters",
    "Backoff",
    "Delivery",
    "DeliveryError",
    "DirectoryAdapter",
    "DocumentWriter",
    "Factory",
    "Health",
    "HealthState",
    "OutboundAdapter",
    "OutboxRunner",
    "ReferenceImporter",
    "Table",
    "build_adapter",
    "build_adapters",
    "factory_of",
    "read_file",
    "redact_url",
    "register_kind",
]
