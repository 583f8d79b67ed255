"""Northbound sinks: MQTT, OPC UA and the status page. Each is the only importer of its library.

Sinks never import drivers or each other; they see the runtime only through ``RuntimeView``.
"""
