"""Sparkplug B 3.0 for the edge node: payloads, topics and session state, without MQTT I/O.

- :mod:`gateway.sparkplug.payload`: the payload as Python values and its protobuf encoding
  (the only module that uses the generated ``sparkplug_b_pb2``), Eclipse Sparkplug 3.0.0 ch. 6.
- :mod:`gateway.sparkplug.topics`: topic names and id rules, ch. 4.
- :mod:`gateway.sparkplug.node`: :class:`EdgeNode`, seq, bdSeq, aliases, BIRTH/DATA/DEATH
  messages and the Rebirth command, ch. 4-6.

The MQTT sink publishes what an :class:`EdgeNode` returns; nothing here opens a socket.
"""

from gateway.sparkplug.node import (
    BDSEQ,
    QUALITY,
    REBIRTH,
    BdSeqFile,
    EdgeNode,
    Message,
    QualityCode,
    datatype_of,
    quality_code,
)
from gateway.sparkplug.payload import (
    DataType,
    Metric,
    MetricValue,
    Payload,
    PropertyValue,
    SparkplugError,
    decode,
    encode,
    fits,
    sequenced,
)
from gateway.sparkplug.topics import (
    NAMESPACE,
    CommandTopic,
    MessageType,
    check_id,
    command_subscriptions,
    parse_command_topic,
    topic,
)

__all__ = [
    "BDSEQ",
    "NAMESPACE",
    "QUALITY",
    "REBIRTH",
    "BdSeqFile",
    "CommandTopic",
    "DataType",
    "EdgeNode",
    "Message",
    "MessageType",
    "Metric",
    "MetricValue",
    "Payload",
    "PropertyValue",
    "QualityCode",
    "SparkplugError",
    "check_id",
    "command_subscriptions",
    "datatype_of",
    "decode",
    "encode",
    "fits",
    "parse_command_topic",
    "quality_code",
    "sequenced",
    "topic",
]
