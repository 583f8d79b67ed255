"""How buffered messages reach the socket, against a real mosquitto: written in the same turn
of the event loop (no writer while the socket takes everything), what the socket does not
take waits for a writer, and the replay task is not woken when there is nothing to replay."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from drivers.modbus.transport import RegisterServer
from gateway.app import Gateway
from gateway.sinks import mqtt as mqtt_sink
from tests.conftest import free_port
from tests.sinks.conftest import Mosquitto, Watcher
from tests.sinks.test_mqtt import LATHE, Machine, fast_sink, make_config, running, wait_for


def count_writers(monkeypatch: pytest.MonkeyPatch, loop: asyncio.AbstractEventLoop) -> list[int]:
    added: list[int] = []
    real = loop.add_writer

    def add_writer(fd: Any, callback: Any, *args: Any) -> None:
        added.append(fd)
        real(fd, callback, *args)

    monkeypatch.setattr(loop, "add_writer", add_writer)
    return added


async def test_values_are_written_without_a_writer_and_the_socket_has_nodelay(
    tmp_path: Path, mosquitto_broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = mosquitto_broker.port
    dev_port = free_port()
    gw = Gateway(make_config(tmp_path, dev_port, {"port": port, "qos_values": 0}))
    sink = fast_sink(gw)
    added = count_writers(monkeypatch, asyncio.get_running_loop())
    wakes: list[int] = []
    real_set = sink._buffer._replay_wake.set

    def wake() -> None:
        wakes.append(1)
        real_set()

    monkeypatch.setattr(sink._buffer._replay_wake, "set", wake)
    async with (
        Watcher(port, f"{LATHE}/count") as w,
        RegisterServer([Machine()], port=dev_port),
        running(gw, sink),
    ):
        await wait_for(lambda: gw.health["mqtt"]["connected"])
        client = sink._link.client
        assert client is not None
        sock = client.socket()
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        await w.wait(lambda: len(w.on(f"{LATHE}/count")) >= 10)
        # Every poll's messages went out, each written in the turn it was queued in.
        assert added == []
        assert not sink._link._writing
        # Nothing was buffered on disk: the replay task was never woken for it.
        assert wakes == []
    assert gw.health["mqtt"]["dropped"] == 0


async def test_what_the_socket_does_not_take_waits_for_a_writer(
    tmp_path: Path, mosquitto_broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = mosquitto_broker.port
    dev_port = free_port()
    gw = Gateway(make_config(tmp_path, dev_port, {"port": port, "qos_values": 0}))
    sink = fast_sink(gw)
    added = count_writers(monkeypatch, asyncio.get_running_loop())
    # A socket that takes 7 bytes and then is full, once in every three sends.
    calls = [0]
    real_send = mqtt_sink._Client._sock_send

    def sock_send(self: mqtt_sink._Client, buf: bytes | bytearray) -> int:
        calls[0] += 1
        if calls[0] % 3 == 1 and len(buf) > 7:
            return real_send(self, buf[:7])
        if calls[0] % 3 == 2:
            raise BlockingIOError
        return real_send(self, buf)

    monkeypatch.setattr(mqtt_sink._Client, "_sock_send", sock_send)
    async with Watcher(port, f"{LATHE}/count") as w:
        async with RegisterServer([Machine()], port=dev_port), running(gw, sink):
            await w.wait(lambda: len(w.on(f"{LATHE}/count")) >= 10)
            assert added  # the rest went when the socket was writable
            await wait_for(lambda: not sink._link._writing and not sink._link._writer)
        docs = [m.json() for m in w.on(f"{LATHE}/count")]
    # Whole messages, in order (the last ones: the device stopping, Bad with no value).
    counts = [d["value"] for d in docs if d["quality"] == "good"]
    assert len(counts) >= 5
    assert counts == sorted(counts)
    assert gw.health["mqtt"]["dropped"] == 0
