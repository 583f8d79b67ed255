"""Simulators of the devices in ``config/profiles/``, one per Modbus profile.

Pure: no pymodbus and no I/O; ``drivers.modbus.transport.RegisterServer`` serves them. Each
serves exactly the registers its profile reads (no more, so that a profile that strays
outside the map fails against it) and takes physical values (volts, °C, Hz), encoding them
as the device would. The maps are written out here independently of the profile files on
purpose: the simulator is the reference the profile is tested against.
"""

from __future__ import annotations

from typing import ClassVar

from drivers.modbus.config import Table
from drivers.modbus.simulator import Faults, RegisterMapDevice

__all__ = ["AnalogIn8", "DeltaVfd", "EastronSdm630", "PidController"]


class EastronSdm630(RegisterMapDevice):
    """Eastron SDM630: input registers, float32 ABCD, parameter n at 2 x (n - 1)."""

    #: Parameter name -> zero-based input register (the modicon reference minus 30001).
    PARAMETERS: ClassVar[dict[str, int]] = {
        "voltage_l1": 0,
        "voltage_l2": 2,
        "voltage_l3": 4,
        "current_l1": 6,
        "current_l2": 8,
        "current_l3": 10,
        "power_l1": 12,
        "power_l2": 14,
        "power_l3": 16,
        "power_total": 52,
        "power_factor": 62,
        "frequency": 70,
        "energy_import": 72,
        "energy_export": 74,
        "energy_total": 342,
    }

    def __init__(self, unit_id: int = 1, *, faults: Faults | None = None) -> None:
        super().__init__(unit_id, faults=faults)
        for address in self.PARAMETERS.values():
            self.serve(Table.INPUT, address, 2)

    def measure(self, **values: float) -> None:
        """Set parameters by name, e.g. ``measure(voltage_l1=230.1, frequency=50.0)``."""
        for name, value in values.items():
            self.put(self.PARAMETERS[name], "float32", value, "ABCD", table=Table.INPUT)


class PidController(RegisterMapDevice):
    """The generic PID controller template: holding 0..3 = PV, SP, output (x10), status."""

    ALARM_1, ALARM_2, SENSOR_FAULT = 0, 1, 2

    def __init__(self, unit_id: int = 1, *, faults: Faults | None = None) -> None:
        super().__init__(unit_id, faults=faults)
        self.serve(Table.HOLDING, 0, 4)

    def measure(self, *, pv: float, sp: float, output: float, alarms: tuple[int, ...] = ()) -> None:
        self.put(0, "int16", round(pv * 10))
        self.put(1, "int16", round(sp * 10))
        self.put(2, "int16", round(output * 10))
        self.put(3, "uint16", sum(1 << bit for bit in alarms))


class AnalogIn8(RegisterMapDevice):
    """The 8-channel analog input template: input 0..7 = counts 0..65535 over the range;
    channels 1-4 4-20 mA, 5-8 0-10 V."""

    FULL_SCALE = 65535

    def __init__(self, unit_id: int = 1, *, faults: Faults | None = None) -> None:
        super().__init__(unit_id, faults=faults)
        self.serve(Table.INPUT, 0, 8)

    def counts(self, channel: int, counts: int) -> None:
        """Raw counts of channel 1..8."""
        self.put(channel - 1, "uint16", counts, table=Table.INPUT)

    def milliamps(self, channel: int, ma: float) -> None:
        """Channels 1-4: a 4-20 mA signal, as the module's ADC rounds it."""
        self.counts(channel, round((ma - 4.0) / 16.0 * self.FULL_SCALE))

    def volts(self, channel: int, volts: float) -> None:
        """Channels 5-8: a 0-10 V signal."""
        self.counts(channel, round(volts / 10.0 * self.FULL_SCALE))


class DeltaVfd(RegisterMapDevice):
    """Delta VFD-series status monitor block, holding 2100H..2106H."""

    BASE = 0x2100

    def __init__(self, unit_id: int = 1, *, faults: Faults | None = None) -> None:
        super().__init__(unit_id, faults=faults)
        self.serve(Table.HOLDING, self.BASE, 7)

    def measure(
        self,
        *,
        fault_code: int = 0,
        status_word: int = 0,
        frequency_command: float = 0.0,
        output_frequency: float = 0.0,
        output_current: float = 0.0,
        dc_bus_voltage: float = 0.0,
        output_voltage: float = 0.0,
    ) -> None:
        words = [
            fault_code,
            status_word,
            round(frequency_command * 100),
            round(output_frequency * 100),
            round(output_current * 10),
            round(dc_bus_voltage * 10),
            round(output_voltage * 10),
        ]
        for i, word in enumerate(words):
            self.put(self.BASE + i, "uint16", word)
