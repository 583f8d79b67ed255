"""A complete, minimal driver plugin: ``driver: tcp_value`` asks a TCP server for each tag.

The protocol is one line each way: the driver sends the tag's name and a newline, the server
answers the value as text and a newline. tests/test_plugins.py installs this module as a
real distribution (a ``tcp_value_plugin-0.1.dist-info`` beside it, with the entry point
``tcp_value = tcp_value:describe``) and runs ``retrofit-gw check``, ``schema`` and ``once``
on it. docs/integrator-reference.md ("Adding a driver") shows the same plugin.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from drivers.plugins import DriverPlugin, Issues, PluginDevice, PluginTag
from gateway.errors import ConnectionLost
from gateway.model import RawSample, ReadGroup, Reason, TagSpec


class ValueTag(PluginTag):
    type: Literal["float", "int"] = "float"
    unit: str | None = Field(default=None, max_length=32)
    min: float | None = None
    max: float | None = None


class TcpValueDevice(PluginDevice):
    """A server that answers a tag's name with its value, one line each."""

    driver: Literal["tcp_value"]
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    tags: list[ValueTag] = Field(default_factory=list)


class TcpValueDriver:
    """Implements ``drivers.base.Driver``. Building it must not touch the device."""

    def __init__(self, device: TcpValueDevice) -> None:
        self.device = device
        self.name = device.name
        self.endpoint = f"{device.host}:{device.port}"
        self.tags: tuple[TagSpec, ...] = tuple(
            TagSpec(
                index=i,
                machine=device.machine,
                device=device.name,
                name=tag.name,
                datatype="float64" if tag.type == "float" else "int64",
                unit=tag.unit,
                minimum=tag.min,
                maximum=tag.max,
                interval=device.interval,
                source=f"line {tag.name}",
            )
            for i, tag in enumerate(device.tags)
        )
        self.groups = (ReadGroup(device.interval, tuple(range(len(self.tags)))),)
        self._link: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def connect(self) -> None:
        await self.close()
        try:
            self._link = await asyncio.open_connection(self.device.host, self.device.port)
        except OSError as exc:
            raise ConnectionLost(f"{self.endpoint}: {exc}") from exc

    async def read(self, group: int) -> Sequence[RawSample]:
        if self._link is None:
            raise ConnectionLost(f"{self.endpoint}: not connected")
        reader, writer = self._link
        samples = []
        for i in self.groups[group].indices:
            tag = self.device.tags[i]
            writer.write(f"{tag.name}\n".encode())
            await writer.drain()
            line = await reader.readline()
            if not line:
                raise ConnectionLost(f"{self.endpoint} closed the connection")
            text = line.decode(errors="replace").strip()
            try:
                value = float(text) if tag.type == "float" else int(text)
            except ValueError:
                samples.append(RawSample(i, None, reason=Reason.DECODE_ERROR, detail=text))
            else:
                samples.append(RawSample(i, value))
        return samples

    def poll_timeout(self, group: int) -> float:
        # One answer per tag, each within the device's timeout.
        return self.device.timeout * len(self.groups[group].indices) + 0.1

    async def close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link[1].close()
            with contextlib.suppress(OSError):
                await link[1].wait_closed()


def check(device: TcpValueDevice) -> Issues:
    """The driver's own cross-checks, located under the device."""
    for k, tag in enumerate(device.tags):
        if tag.min is not None and tag.max is not None and tag.min > tag.max:
            yield ("tags", k, "min"), f"min {tag.min:g} is larger than max {tag.max:g}"


def describe() -> DriverPlugin[TcpValueDevice]:
    """The entry point: ``tcp_value = "tcp_value:describe"``."""
    return DriverPlugin("tcp_value", TcpValueDevice, TcpValueDriver, check)
