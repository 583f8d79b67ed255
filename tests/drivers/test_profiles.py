"""Every Modbus profile in config/profiles/ against a simulator of its device: a real pymodbus
server on 127.0.0.1, the gateway's own poll, and known physical values read back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from drivers.modbus.profile_sims import AnalogIn8, DeltaVfd, EastronSdm630, PidController
from drivers.modbus.simulator import RegisterMapDevice
from drivers.modbus.transport import RegisterServer
from gateway.app import Gateway
from gateway.config import load_config
from gateway.model import Quality

HEAD = "gateway: {site: plant1, area: machining, line: line-a}\ndevices:\n"


def device(name: str, machine: str, profile: str, port: int, unit_id: int = 1) -> str:
    """A device that differs from others on the same profile only in what identifies it."""
    return (
        f"  - name: {name}\n"
        f"    driver: modbus_tcp\n"
        f"    machine: {machine}\n"
        f"    host: 127.0.0.1\n"
        f"    port: {port}\n"
        f"    unit_id: {unit_id}\n"
        f"    profile: {profile}\n"
    )


async def poll(
    tmp_path: Path,
    devices: str,
    sims: list[RegisterMapDevice],
    port: int,
    uncertain: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Every tag's value after one poll; every tag must be Good but those in ``uncertain``."""
    path = tmp_path / "gateway.yaml"
    path.write_text(HEAD + devices, encoding="utf-8")
    loaded = load_config(path)
    async with RegisterServer(sims, port=port):
        results = await Gateway(loaded).poll_once()
    assert results
    qualities = {spec.key: (r.quality, r.reason, r.detail) for spec, r in results}
    wrong = {
        key: q
        for key, q in qualities.items()
        if q[0] is not (Quality.UNCERTAIN if key in uncertain else Quality.GOOD)
    }
    assert not wrong, wrong
    return {spec.key: r.value for spec, r in results}


def rounded(values: dict[str, object], digits: int) -> dict[str, object]:
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in values.items()}


async def test_eastron_sdm630_two_meters_share_the_profile(tmp_path: Path, port: int) -> None:
    first, second = EastronSdm630(unit_id=1), EastronSdm630(unit_id=2)
    first.measure(
        voltage_l1=230.1,
        voltage_l2=231.4,
        voltage_l3=229.8,
        current_l1=12.5,
        current_l2=11.75,
        current_l3=13.0,
        power_l1=2876.25,
        power_l2=2719.0,
        power_l3=2987.4,
        power_total=8582.65,
        power_factor=0.97,
        frequency=50.02,
        energy_import=123456.5,
        energy_export=12.25,
        energy_total=123468.75,
    )
    second.measure(voltage_l1=398.0, frequency=49.98, energy_import=7.5)
    devices = device("meter-1", "press-4", "eastron_sdm630", port, 1) + device(
        "meter-2", "press-5", "eastron_sdm630", port, 2
    )
    got = await poll(
        tmp_path, devices, [first, second], port, uncertain=frozenset({"press-5/voltage_l1"})
    )
    # float32 keeps about 7 significant digits: compare as the meter's display would.
    assert rounded({k: v for k, v in got.items() if k.startswith("press-4/")}, 2) == {
        "press-4/voltage_l1": 230.1,
        "press-4/voltage_l2": 231.4,
        "press-4/voltage_l3": 229.8,
        "press-4/current_l1": 12.5,
        "press-4/current_l2": 11.75,
        "press-4/current_l3": 13.0,
        "press-4/power_l1": 2876.25,
        "press-4/power_l2": 2719.0,
        "press-4/power_l3": 2987.4,
        "press-4/power_total": 8582.65,
        "press-4/power_factor": 0.97,
        "press-4/frequency": 50.02,
        "press-4/energy_import": 123456.5,
        "press-4/energy_export": 12.25,
        "press-4/energy_total": 123468.75,
    }
    # Above the profile's 0..300 V (a line-to-line value where a phase voltage belongs):
    # read, but Uncertain.
    assert round(got["press-5/voltage_l1"], 2) == 398.0
    assert round(got["press-5/frequency"], 2) == 49.98
    assert got["press-5/energy_import"] == 7.5
    assert got["press-5/current_l1"] == 0.0


async def test_generic_pid_controller(tmp_path: Path, port: int) -> None:
    sim = PidController()
    sim.measure(pv=182.4, sp=180.0, output=37.5, alarms=(PidController.ALARM_2,))
    got = await poll(
        tmp_path, device("oven-tc", "oven-2", "generic_pid_controller", port), [sim], port
    )
    assert rounded(got, 6) == {
        "oven-2/process_value": 182.4,
        "oven-2/setpoint": 180.0,
        "oven-2/output": 37.5,
        "oven-2/status": 2,
        "oven-2/alarm_1": False,
        "oven-2/alarm_2": True,
        "oven-2/sensor_fault": False,
    }


async def test_generic_pid_controller_negative_temperature(tmp_path: Path, port: int) -> None:
    sim = PidController()
    sim.measure(pv=-12.3, sp=-20.0, output=100.0, alarms=(0, 2))
    got = await poll(
        tmp_path, device("cold-tc", "freezer", "generic_pid_controller", port), [sim], port
    )
    assert round(got["freezer/process_value"], 6) == -12.3
    assert (got["freezer/alarm_1"], got["freezer/sensor_fault"]) == (True, True)


async def test_analog_in_8ch_with_one_channel_rescaled(tmp_path: Path, port: int) -> None:
    sim = AnalogIn8()
    for channel, ma in ((1, 12.0), (2, 4.0), (3, 20.0), (4, 7.2)):
        sim.milliamps(channel, ma)
    for channel, volts in ((5, 0.0), (6, 2.5), (7, 10.0), (8, 7.35)):
        sim.volts(channel, volts)
    # Channel 1 drives a 0..250 bar transmitter: the integrator overrides just that tag.
    devices = device("press-ai", "press-4", "analog_in_8ch", port) + (
        "    tags:\n"
        "      - {name: ch1, address: 30001, type: uint16, scale: 0.0038147554741741053,"
        " unit: bar, min: 0, max: 250}\n"
    )
    got = await poll(tmp_path, devices, [sim], port)
    # One count is 16/65535 mA, 10/65535 V or 250/65535 bar: the rounding to whole counts
    # shows in the third decimal.
    assert rounded(got, 2) == {
        "press-4/ch1": 125.0,
        "press-4/ch2": 4.0,
        "press-4/ch3": 20.0,
        "press-4/ch4": 7.2,
        "press-4/ch5": 0.0,
        "press-4/ch6": 2.5,
        "press-4/ch7": 10.0,
        "press-4/ch8": 7.35,
    }


async def test_delta_vfd(tmp_path: Path, port: int) -> None:
    sim = DeltaVfd(unit_id=1)
    sim.measure(
        fault_code=0,
        status_word=0x0003,
        frequency_command=120.0,
        output_frequency=119.87,
        output_current=6.4,
        dc_bus_voltage=321.5,
        output_voltage=228.9,
    )
    got = await poll(tmp_path, device("spindle", "mill-2", "delta_vfd", port), [sim], port)
    assert rounded(got, 6) == {
        "mill-2/fault_code": 0,
        "mill-2/status_word": 3,
        "mill-2/frequency_command": 120.0,
        "mill-2/output_frequency": 119.87,
        "mill-2/output_current": 6.4,
        "mill-2/dc_bus_voltage": 321.5,
        "mill-2/output_voltage": 228.9,
    }


@pytest.mark.parametrize("fault_code", [16, 0xFFFF])
async def test_delta_vfd_fault_code_is_read_whole(
    tmp_path: Path, port: int, fault_code: int
) -> None:
    sim = DeltaVfd()
    sim.measure(fault_code=fault_code)
    got = await poll(tmp_path, device("spindle", "mill-2", "delta_vfd", port), [sim], port)
    assert got["mill-2/fault_code"] == fault_code
