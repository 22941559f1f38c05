"""fieldsync: an offline-first CRDT replication server for field-service apps."""

__version__ = "0.1.0"
