"""A real mosquitto per test, and a thread-free MQTT subscriber to look at what it holds.

``mosquitto`` yields the port of a fresh broker on 127.0.0.1; ``mosquitto_broker`` yields the
``Mosquitto`` itself, for tests that stop and restart it (on the same port) or need users.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import free_port

MOSQUITTO = "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = "/usr/bin/mosquitto_passwd"


class Mosquitto:
    """One mosquitto process with a generated config; restartable on the same port."""

    def __init__(self, workdir: Path, port: int, users: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.port = port
        self.host = "127.0.0.1"
        self.users = users or {}
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "mosquitto.log"
        self.conf = workdir / "mosquitto.conf"
        lines = [f"listener {port} 127.0.0.1", "persistence false"]
        if self.users:
            passwd = workdir / "passwd"
            for i, (user, password) in enumerate(self.users.items()):
                create = ["-c"] if i == 0 else []
                subprocess.run(
                    [MOSQUITTO_PASSWD, "-b", *create, str(passwd), user, password],
                    check=True,
                    capture_output=True,
                )
            lines += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            lines.append("allow_anonymous true")
        if os.geteuid() == 0:
            # As root, mosquitto drops to the "mosquitto" user, which cannot read tmp_path.
            lines.append("user root")
        self.conf.write_text("\n".join(lines) + "\n")

    def log_text(self) -> str:
        """What mosquitto logged: "Client X disconnected." means a clean MQTT DISCONNECT,
        "Client X closed its connection." a socket closed without one."""
        return self.log.read_text(errors="replace")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _spawn(self) -> None:
        assert not self.running, "mosquitto is already running"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT
            )

    def _accepts(self) -> bool:
        if not self.running:
            raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def start(self) -> None:
        """Start and wait until the port accepts (blocking: for fixtures)."""
        self._spawn()
        deadline = time.monotonic() + 5
        while not self._accepts():
            assert time.monotonic() < deadline, "mosquitto did not start within 5 s"
            time.sleep(0.02)

    async def astart(self) -> None:
        """Start without blocking the event loop (a gateway may be running in it)."""
        self._spawn()
        deadline = time.monotonic() + 5
        while not self._accepts():
            assert time.monotonic() < deadline, "mosquitto did not start within 5 s"
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    async def astop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        for _ in range(500):
            if proc.poll() is not None:
                return
            await asyncio.sleep(0.01)
        proc.kill()
        proc.wait(5)


@pytest.fixture
def mosquitto_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "mosquitto", free_port())
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def mosquitto(mosquitto_broker: Mosquitto) -> int:
    return mosquitto_broker.port


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    qos: int

    def json(self) -> Any:
        return json.loads(self.payload)


_ids = itertools.count()


class Watcher:
    """A subscriber driven by polling paho from the test's event loop: no thread to leak.

    ``async with Watcher(port) as w: await w.wait(lambda: ...)``. Every message received is
    in ``messages``, oldest first; ``latest(topic)`` is the newest on a topic.
    """

    def __init__(
        self,
        port: int,
        topic: str = "#",
        *,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.port = port
        self.topic = topic
        self.messages: list[Message] = []
        self._subscribed = False
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"watcher-{os.getpid()}-{next(_ids)}"
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.append(Message(msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos))

    def _on_subscribe(self, *args: Any) -> None:
        self._subscribed = True

    async def __aenter__(self) -> Watcher:
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.subscribe(self.topic, qos=1)
        await self.wait(lambda: self._subscribed, 5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Without an external loop, paho writes the DISCONNECT and closes the socket at once.
        self.client.disconnect()
        # loop() made paho a socket pair; its __del__ would close it, but when the client is
        # collected as part of a reference cycle the sockets may be finalised first
        # (unclosed-socket ResourceWarning, an error here).
        self.client._reset_sockets()

    def pump(self) -> None:
        """Process what has arrived (paho's loop() reads one packet per call)."""
        idle = 0
        for _ in range(100_000):
            before = len(self.messages)
            self.client.loop(timeout=0)
            idle = idle + 1 if len(self.messages) == before else 0
            if idle >= 3:
                return

    async def wait(self, done: Callable[[], object], seconds: float = 5.0) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self.pump()
            if done():
                return
            if time.monotonic() >= deadline:
                topics = sorted({m.topic for m in self.messages})
                raise AssertionError(f"timed out after {seconds} s; topics seen: {topics}")
            await asyncio.sleep(0.02)

    async def settle(self, seconds: float) -> None:
        """Keep receiving for ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.pump()
            await asyncio.sleep(0.02)
        self.pump()

    def on(self, topic: str) -> list[Message]:
        return [m for m in self.messages if m.topic == topic]

    def latest(self, topic: str) -> Message | None:
        for m in reversed(self.messages):
            if m.topic == topic:
                return m
        return None


@pytest.fixture(autouse=True)
def _synchronised_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sink tests see a synchronised clock unless they inject another: what a payload holds
    must not depend on whether the machine running the tests has NTP (CI's VM has none).
    gateway.clock's own tests read the real kernel state."""
    import gateway.clock as clock  # noqa: PLC0415

    monkeypatch.setattr(clock, "probe_sync_source", lambda: clock.SyncSource("test", lambda: True))
