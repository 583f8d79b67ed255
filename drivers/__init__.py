"""Protocol drivers. Each subpackage speaks one protocol; they never import each other or sinks.

``BUILTIN`` maps a config ``driver:`` value to ``"module:factory"``; the runtime imports lazily.
Drivers from other distributions join them through an entry point: see ``drivers.plugins``.
"""

from __future__ import annotations

__all__ = ["BUILTIN"]

BUILTIN: dict[str, str] = {
    "modbus_tcp": "drivers.modbus.driver:ModbusTcpDriver",
    "modbus_rtu": "drivers.modbus.driver:ModbusRtuDriver",
    "modbus_rtu_over_tcp": "drivers.modbus.driver:ModbusRtuOverTcpDriver",
    "ascii_serial": "drivers.ascii_serial.driver:AsciiSerialDriver",
}
