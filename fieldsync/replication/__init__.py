"""Replication: the `fieldsync.v1` wire protocol, y-websocket compatibility, rooms and the one
write path for documents; in cluster mode, the node-to-node links (`Cluster`) through which a
node serves the documents other nodes own."""

from fieldsync.replication._codec import (
    Control,
    DocMessage,
    SyncStep,
    YAwareness,
    YSync,
    decode_body,
    decode_frame,
    decode_state_vector,
    decode_y,
    encode_body,
    encode_frame,
    encode_sync,
)
from fieldsync.replication._connection import Limits, SessionClosed
from fieldsync.replication._follower import Follower, Hints
from fieldsync.replication._link import CLUSTER_PATH, Cluster
from fieldsync.replication._replicator import (
    AlreadyExists,
    DocTooLarge,
    Forbidden,
    InvalidUpdate,
    OwnerUnavailable,
    Replicator,
)
from fieldsync.replication._room import Room
from fieldsync.replication._service import (
    SERVICE_ROLE,
    Edited,
    ServiceWriter,
    edit_as,
    service_principal,
)
from fieldsync.replication._session import V1Session
from fieldsync.replication._views import View, Views
from fieldsync.replication._websocket import Endpoints
from fieldsync.replication._yws import YwsSession

__all__ = [
    "CLUSTER_PATH",
    "SERVICE_ROLE",
    "AlreadyExists",
    "Cluster",
    "Control",
    "DocMessage",
    "DocTooLarge",
    "Edited",
    "Endpoints",
    "Follower",
    "Forbidden",
    "Hints",
    "InvalidUpdate",
    "Limits",
    "OwnerUnavailable",
    "Replicator",
    "Room",
    "ServiceWriter",
    "SessionClosed",
    "SyncStep",
    "V1Session",
    "View",
    "Views",
    "YAwareness",
    "YSync",
    "YwsSession",
    "decode_body",
    "decode_frame",
    "decode_state_vector",
    "decode_y",
    "edit_as",
    "encode_body",
    "encode_frame",
    "encode_sync",
    "service_principal",
]
