"""Adapters: the outbox that takes committed changes to outbound systems (ERP, relational
projections), and inbound adapters that write documents through the device write path."""

from fieldsync.adapters._base import (
    Adapter,
    AdapterConfigError,
    Delivery,
    DeliveryError,
    DocumentWriter,
    Health,
    HealthState,
    OutboundAdapter,
)

__all__ = [
    "Adapter",
    "AdapterConfigError",
    "Delivery",
    "DeliveryError",
    "DocumentWriter",
    "Health",
    "HealthState",
    "OutboundAdapter",
]
