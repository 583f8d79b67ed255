"""Sparkplug B topic names: build them for the edge node's messages, parse the commands.

Eclipse Sparkplug 3.0.0, chapter 4 "Topics and Messages":

- §4.1 tck-id-topic-structure: ``namespace/group_id/message_type/edge_node_id/[device_id]``
  with the namespace ``spBv1.0`` (tck-id-topic-structure-namespace-a).
- tck-id-topic-structure-namespace-valid-group-id, -valid-edge-node-id, -valid-device-id: the
  ids are UTF-8 strings without ``+``, ``/`` and ``#``.
- tck-id-topic-structure-namespace-device-id-associated-message-types and
  -non-associated-message-types: DBIRTH, DDEATH, DDATA and DCMD carry a device id; NBIRTH,
  NDEATH, NDATA and NCMD do not.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from gateway.sparkplug.payload import SparkplugError

__all__ = [
    "NAMESPACE",
    "CommandTopic",
    "MessageType",
    "check_id",
    "command_subscriptions",
    "parse_command_topic",
    "topic",
]

NAMESPACE = "spBv1.0"
_RESERVED = frozenset("+/#")


class MessageType(enum.StrEnum):
    NBIRTH = "NBIRTH"
    NDEATH = "NDEATH"
    NDATA = "NDATA"
    NCMD = "NCMD"
    DBIRTH = "DBIRTH"
    DDEATH = "DDEATH"
    DDATA = "DDATA"
    DCMD = "DCMD"

    @property
    def for_device(self) -> bool:
        return self.value[0] == "D"


def check_id(kind: str, value: str) -> str:
    """``value`` if it is a valid group, edge node or device id, else a :class:`SparkplugError`.

    An empty id is refused too: it would make an empty topic level, which hosts read as a
    different topic shape.
    """
    if not value:
        raise SparkplugError(f"Sparkplug {kind} must not be empty")
    bad = sorted(_RESERVED.intersection(value))
    if bad:
        raise SparkplugError(
            f"Sparkplug {kind} {value!r} contains {' '.join(bad)}; "
            "group, edge node and device ids must not contain + / #"
        )
    return value


def topic(
    message_type: MessageType, group_id: str, edge_node_id: str, device_id: str | None = None
) -> str:
    """The topic of one message, ids checked; a device id exactly for the D* types."""
    check_id("group id", group_id)
    check_id("edge node id", edge_node_id)
    if message_type.for_device:
        if device_id is None:
            raise SparkplugError(f"{message_type} needs a device id")
        check_id("device id", device_id)
        return f"{NAMESPACE}/{group_id}/{message_type}/{edge_node_id}/{device_id}"
    if device_id is not None:
        raise SparkplugError(f"{message_type} takes no device id")
    return f"{NAMESPACE}/{group_id}/{message_type}/{edge_node_id}"


class CommandTopic(NamedTuple):
    message_type: MessageType
    group_id: str
    edge_node_id: str
    device_id: str | None


def parse_command_topic(name: str) -> CommandTopic:
    """Split an NCMD or DCMD topic; anything else is a :class:`SparkplugError`."""
    parts = name.split("/")
    if len(parts) < 4 or parts[0] != NAMESPACE:
        raise SparkplugError(f"{name!r} is not a Sparkplug B topic")
    kind = parts[2]
    if kind == MessageType.NCMD and len(parts) == 4:
        return CommandTopic(MessageType.NCMD, parts[1], parts[3], None)
    if kind == MessageType.DCMD and len(parts) == 5:
        return CommandTopic(MessageType.DCMD, parts[1], parts[3], parts[4])
    raise SparkplugError(f"{name!r} is not an NCMD or DCMD topic")


def command_subscriptions(group_id: str, edge_node_id: str) -> tuple[str, str]:
    """The NCMD and DCMD topic filters an edge node subscribes to before its NBIRTH.

    tck-id-message-flow-edge-node-ncmd-subscribe asks for NCMD at QoS 1.
    """
    check_id("group id", group_id)
    check_id("edge node id", edge_node_id)
    return (
        f"{NAMESPACE}/{group_id}/{MessageType.NCMD}/{edge_node_id}",
        f"{NAMESPACE}/{group_id}/{MessageType.DCMD}/{edge_node_id}/+",
    )
