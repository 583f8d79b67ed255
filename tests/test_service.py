"""``retrofit-gw run`` as a systemd service: sd_notify, the watchdog, SIGHUP reloads.

The process tests run ``python -m gateway run`` with a real unix datagram socket as
``$NOTIFY_SOCKET``, as systemd would, against a simulated Modbus device in this process.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from drivers.modbus.config import Table
from drivers.modbus.simulator import RegisterMapDevice
from drivers.modbus.transport import RegisterServer
from gateway import service
from gateway.app import Gateway
from gateway.config import GatewayConfig, LoadedConfig, load_config
from gateway.errors import GatewayError
from gateway.service import ConfigSummary, OnStarted, describe_changes
from gateway.systemd import Notifier, format_message, watchdog_interval
from tests.conftest import free_port

# --- unit tests -----------------------------------------------------------------------------


def test_notify_message_is_key_value_lines() -> None:
    assert format_message({"READY": 1, "STATUS": "2 device(s)"}) == b"READY=1\nSTATUS=2 device(s)\n"
    # A newline in a value would smuggle in another assignment.
    assert format_message({"STATUS": "a\nREADY=1"}) == b"STATUS=a READY=1\n"
    assert format_message({"STATUS": "Drehzahl °"}) == "STATUS=Drehzahl °\n".encode()
    with pytest.raises(ValueError, match="not a notify key"):
        format_message({"A=B": 1})


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process_only() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "1000000"}) == 0.5
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    pid = os.getpid()
    env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(pid)}
    assert watchdog_interval(env) == 1.0
    # Inherited by a child of the main process: not the child's watchdog.
    assert watchdog_interval(env, pid=pid + 1) is None
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "x"}) is None


def test_notifier_without_notify_socket_does_nothing() -> None:
    n = Notifier.from_env({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled
    assert n.watchdog is None
    assert not n.ready("up")


@contextmanager
def _datagram_socket(address: str) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(address)
        sock.settimeout(2)
        yield sock
    finally:
        sock.close()


def test_notifier_sends_to_path_and_abstract_sockets(tmp_path: Path) -> None:
    path = str(tmp_path / "n.sock")
    with _datagram_socket(path) as sock:
        n = Notifier(path)
        assert n.ready("1 device(s)")
        assert sock.recv(4096) == b"READY=1\nSTATUS=1 device(s)\n"
        assert n.reloading()
        fields = _parse(sock.recv(4096))
        assert fields["RELOADING"] == "1"
        usec = int(fields["MONOTONIC_USEC"])
        assert abs(usec - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 5_000_000
    name = f"retrofit-gw-test-{os.getpid()}-{time.monotonic_ns()}"
    with _datagram_socket("\0" + name) as sock:
        assert Notifier("@" + name).stopping()
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping\n"
    # Nobody listening any more: reported once in the log, never raised.
    assert not Notifier(path).ready("x")


async def test_watchdog_pings_at_its_interval_until_told_to_quit(tmp_path: Path) -> None:
    path = str(tmp_path / "w.sock")
    with _datagram_socket(path) as sock:
        sock.setblocking(False)
        n = Notifier(path, watchdog=0.05)
        quit_ = asyncio.Event()
        task = asyncio.create_task(n.run_watchdog(quit_))
        await asyncio.sleep(0.28)
        quit_.set()
        await asyncio.wait_for(task, 1)
        pings = []
        while True:
            try:
                pings.append(sock.recv(64))
            except BlockingIOError:
                break
        assert set(pings) == {b"WATCHDOG=1\n"}
        assert 4 <= len(pings) <= 7, pings


def _loaded(devices: list[str], *, web: bool = True) -> LoadedConfig:
    data: dict[str, Any] = {
        "gateway": {"name": "gw", "site": "s", "area": "a", "line": "l"},
        "devices": [
            {
                "name": name,
                "driver": "modbus_tcp",
                "machine": name,
                "host": "127.0.0.1",
                "port": 1502 + i,
                "addressing": "zero_based",
                "tags": [{"name": "speed", "table": "holding", "address": 0, "type": "uint16"}],
            }
            for i, name in enumerate(devices)
        ],
    }
    if web:
        data["web"] = {"port": 8081}
    return LoadedConfig(Path("gw.yaml"), GatewayConfig.model_validate(data))


def test_reload_changes_are_described_coarsely() -> None:
    one = ConfigSummary.of(_loaded(["lathe"]))
    two = ConfigSummary.of(_loaded(["lathe", "mill"], web=False))
    assert describe_changes(one, two) == (
        "devices 1 -> 2; added mill; sections changed: web (removed)"
    )
    assert describe_changes(two, one) == (
        "devices 2 -> 1; removed mill; sections changed: web (added)"
    )
    assert describe_changes(one, one) == "1 device(s); sections changed: none"


async def test_serve_reloads_in_one_task_tree_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """The supervisor alone, in this process, with a stand-in for the gateway."""
    config = tmp_path / "gateway.yaml"
    _write_config(config, free_port(), [_device("lathe-1", free_port())])
    runs: list[tuple[int, asyncio.Event]] = []

    async def start(loaded: LoadedConfig, stop: asyncio.Event, on_started: OnStarted) -> None:
        runs.append((len(loaded.config.devices), stop))
        on_started(Gateway(loaded), [])
        await stop.wait()

    sent: list[tuple[str, str]] = []

    class Recorder(Notifier):
        def send(self, **fields: str | int) -> bool:
            sent.append(next(iter(fields.items())))  # type: ignore[arg-type]
            return True

    async def until(what: Callable[[], bool]) -> None:
        for _ in range(200):
            if what():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"runs {runs}, sent {sent}")

    stop = asyncio.Event()
    task = asyncio.create_task(
        service.serve(config, load_config(config), stop, start, Recorder(None))
    )
    try:
        await until(lambda: len(runs) == 1)
        config.write_text("gateway: {name: x}\ndevices: []\n")
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: sent[-1][0] == "STATUS")
        assert len(runs) == 1
        assert not runs[0][1].is_set()
        _write_config(config, free_port(), [_device("a", free_port()), _device("b", free_port())])
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: len(runs) == 2)
        assert runs[0][1].is_set()
        assert runs[1][0] == 2
        stop.set()
        await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
    assert runs[1][1].is_set()
    assert [k for k, _ in sent] == ["READY", "STATUS", "RELOADING", "READY", "STOPPING"]
    # The handler is gone with the tree: SIGHUP is the default again (it would end the process).
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL


class _Recorder(Notifier):
    """Every notification, whole, instead of a datagram."""

    def __init__(self) -> None:
        super().__init__(None)
        self.sent: list[dict[str, str | int]] = []

    def send(self, **fields: str | int) -> bool:
        self.sent.append(fields)
        return True

    def keys(self) -> list[str]:
        return [next(iter(m)) for m in self.sent]


def _cannot_listen() -> ExceptionGroup[GatewayError]:
    # What Gateway.run raises when a sink does not start: its TaskGroup's group.
    return ExceptionGroup(
        "unhandled errors in a TaskGroup",
        [GatewayError("web: cannot listen on 127.0.0.1:8081: Address already in use")],
    )


async def _until_in_process(what: Callable[[], bool], about: object) -> None:
    for _ in range(300):
        if what():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(about)


async def test_serve_restores_the_previous_config_when_a_reload_does_not_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.service")
    config = tmp_path / "gateway.yaml"
    _write_config(config, free_port(), [_device("lathe-1", free_port())])
    started: list[list[str]] = []
    attempts: list[list[str]] = []

    async def start(loaded: LoadedConfig, stop: asyncio.Event, on_started: OnStarted) -> None:
        names = [d.name for d in loaded.config.devices]
        attempts.append(names)
        if "mill-1-plc" in names:
            raise _cannot_listen()
        on_started(Gateway(loaded), [])
        started.append(names)
        await stop.wait()

    notifier = _Recorder()
    stop = asyncio.Event()
    task = asyncio.create_task(service.serve(config, load_config(config), stop, start, notifier))
    try:
        await _until_in_process(lambda: len(started) == 1, attempts)
        lathe, mill = _device("lathe-1", free_port()), _device("mill-1", free_port())
        _write_config(config, free_port(), [lathe, mill])
        os.kill(os.getpid(), signal.SIGHUP)
        await _until_in_process(lambda: len(started) == 2, attempts)
        # The file on disk is the broken one: the restored config came from memory.
        assert attempts == [["lathe-1-plc"], ["lathe-1-plc", "mill-1-plc"], ["lathe-1-plc"]]
        assert task.done() is False
        assert notifier.keys() == ["READY", "RELOADING", "STATUS", "READY"]
        cause = "web: cannot listen on 127.0.0.1:8081: Address already in use"
        assert notifier.sent[2]["STATUS"] == (
            f"reload failed: {cause}; restoring the previous config"
        )
        assert notifier.sent[3]["STATUS"] == (
            f"reload failed ({cause}); running the previous config; 1 device(s), 2 tag(s); "
            "sinks: none"
        )
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert [r.getMessage() for r in errors] == [
            f"reload failed: the new config of {config} did not start: {cause}; restoring the "
            "previous config"
        ]
        assert errors[0].exc_info is None  # the machine's state: no traceback

        # Fixed: reloads as usual, and what changed is told against what ran, not what failed.
        _write_config(config, free_port(), [lathe, _device("drill-1", free_port())])
        os.kill(os.getpid(), signal.SIGHUP)
        await _until_in_process(lambda: len(started) == 3, attempts)
        assert started[2] == ["lathe-1-plc", "drill-1-plc"]
        assert notifier.sent[-1]["STATUS"] == "reloaded; 2 device(s), 4 tag(s); sinks: none"
        assert f"reloaded {config}: devices 1 -> 2; added drill-1-plc;" in caplog.text
        stop.set()
        await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
    assert notifier.keys()[-3:] == ["RELOADING", "READY", "STOPPING"]
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL


async def test_serve_exits_when_the_restored_config_does_not_start_either(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tmp_path / "gateway.yaml"
    _write_config(config, free_port(), [_device("lathe-1", free_port())])
    attempts = 0

    async def start(loaded: LoadedConfig, stop: asyncio.Event, on_started: OnStarted) -> None:
        nonlocal attempts
        attempts += 1
        if attempts > 1:
            # The port was taken while the first generation ran: nothing starts any more.
            raise _cannot_listen()
        on_started(Gateway(loaded), [])
        await stop.wait()

    notifier = _Recorder()
    task = asyncio.create_task(
        service.serve(config, load_config(config), asyncio.Event(), start, notifier)
    )
    try:
        await _until_in_process(lambda: attempts == 1, attempts)
        _write_config(config, free_port(), [_device("mill-1", free_port())])
        os.kill(os.getpid(), signal.SIGHUP)
        with pytest.raises(BaseExceptionGroup) as info:
            await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
    assert info.value.subgroup(GatewayError) is not None
    assert attempts == 3
    assert notifier.keys() == ["READY", "RELOADING", "STATUS", "STATUS"]
    assert str(notifier.sent[-1]["STATUS"]).startswith("failed to start: web: cannot listen")
    assert "the previous config did not start either: web: cannot listen" in caplog.text
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL


async def test_serve_fails_when_the_first_config_does_not_start(tmp_path: Path) -> None:
    """Nothing to go back to: the error reaches the caller (`run` exits 1), as before."""
    config = tmp_path / "gateway.yaml"
    _write_config(config, free_port(), [_device("lathe-1", free_port())])

    async def start(loaded: LoadedConfig, stop: asyncio.Event, on_started: OnStarted) -> None:
        raise _cannot_listen()

    notifier = _Recorder()
    with pytest.raises(BaseExceptionGroup) as info:
        await asyncio.wait_for(
            service.serve(config, load_config(config), asyncio.Event(), start, notifier), 5
        )
    assert info.value.subgroup(GatewayError) is not None
    assert notifier.sent == []


# --- the process ----------------------------------------------------------------------------


def _parse(datagram: bytes) -> dict[str, str]:
    lines = datagram.decode().splitlines()
    return dict(line.split("=", 1) for line in lines if line)


class Notifications:
    """What the gateway process told "systemd", each message with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def close(self) -> None:
        self.sock.close()

    def drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return
            self.messages.append((time.monotonic(), _parse(data)))

    async def listen(self, seconds: float) -> None:
        """Receive as things arrive, so that each message's time is its own."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.drain()
            await asyncio.sleep(0.01)

    def having(self, key: str) -> list[tuple[float, dict[str, str]]]:
        return [(t, m) for t, m in self.messages if key in m]

    async def wait(self, key: str, count: int = 1, within: float = 20) -> dict[str, str]:
        """The ``count``-th message (from the start) carrying ``key``."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            self.drain()
            found = self.having(key)
            if len(found) >= count:
                return found[count - 1][1]
            await asyncio.sleep(0.01)
        raise AssertionError(f"no {key} #{count} within {within} s; got {self.messages}")


class Spindle(RegisterMapDevice):
    def __init__(self, rpm: int) -> None:
        super().__init__(unit_id=1)
        self.serve(Table.HOLDING, 0, 2)
        self.set(Table.HOLDING, 0, [rpm, 0])

    def tick(self, now: float) -> None:
        self.set(Table.HOLDING, 1, [self.reads & 0xFFFF])


def _device(name: str, port: int) -> dict[str, Any]:
    return {
        "name": f"{name}-plc",
        "driver": "modbus_tcp",
        "machine": name,
        "host": "127.0.0.1",
        "port": port,
        "interval": 0.1,
        "timeout": 0.05,
        "connect_timeout": 0.2,
        "addressing": "zero_based",
        "tags": [
            {"name": "speed", "table": "holding", "address": 0, "type": "uint16", "unit": "rpm"},
            {"name": "count", "table": "holding", "address": 1, "type": "uint16"},
        ],
    }


def _write_config(
    path: Path, web_port: int, devices: list[dict[str, Any]], **sections: dict[str, Any]
) -> None:
    data = {
        "gateway": {"name": "gw-test", "site": "s", "area": "a", "line": "l"},
        **sections,
        "web": {"host": "127.0.0.1", "port": web_port},
        "devices": devices,
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def _log_tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


@asynccontextmanager
async def _gateway_process(
    config: Path, notify: Notifications, log_path: Path, env: dict[str, str] | None = None
) -> AsyncIterator[subprocess.Popen[bytes]]:
    full_env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), **(env or {})}
    full_env.pop("WATCHDOG_PID", None)
    with log_path.open("wb") as log_file:
        # Not asyncio's subprocess: in 3.11 it watches the child from a thread, and the
        # suite fails any test that leaves a thread behind.
        proc = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "gateway", "run", str(config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)


async def _exited(proc: subprocess.Popen[bytes], within: float = 15) -> int:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if (code := proc.poll()) is not None:
            return code
        await asyncio.sleep(0.02)
    raise AssertionError(f"the gateway did not exit within {within} s")


async def _get(port: int, target: str) -> Any:
    """GET a JSON document from the page: a bare HTTP/1.0 request, no client threads."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(f"GET {target} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw[:200]
    return json.loads(body)


async def _until(
    what: Callable[[], Any], proc: subprocess.Popen[bytes], log_path: Path, within: float = 15
) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert proc.poll() is None, _log_tail(log_path)
        done = what()
        if inspect.isawaitable(done):
            done = await done
        if done:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {within} s\n{_log_tail(log_path)}")


async def _devices(web_port: int) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in await _get(web_port, "/api/devices")}


async def test_ready_after_the_page_listens_then_watchdog_pings_and_stopping_on_sigterm(
    tmp_path: Path,
) -> None:
    web_port, dev_port = free_port(), free_port()
    config = tmp_path / "gateway.yaml"
    _write_config(config, web_port, [_device("lathe-1", dev_port)])
    notify = Notifications(tmp_path / "notify.sock")
    log_path = tmp_path / "gw.log"
    try:
        async with (
            RegisterServer([Spindle(1450)], port=dev_port),
            _gateway_process(config, notify, log_path, {"WATCHDOG_USEC": "1000000"}) as proc,
        ):
            ready = await notify.wait("READY")
            # Right after READY, without retrying: the page must already be listening.
            with socket.create_connection(("127.0.0.1", web_port), timeout=1):
                pass
            assert ready["READY"] == "1"
            assert ready["STATUS"] == "1 device(s), 2 tag(s); sinks: web", ready
            ready_at = notify.having("READY")[0][0]
            await notify.listen(2.2)
            pings = [t for t, m in notify.having("WATCHDOG") if t >= ready_at]
            assert all(m["WATCHDOG"] == "1" for _, m in notify.having("WATCHDOG"))
            # Every WATCHDOG_USEC/2 = 0.5 s.
            assert 3 <= len(pings) <= 6, pings
            gaps = [b - a for a, b in itertools.pairwise(pings)]
            assert all(0.3 < g < 0.8 for g in gaps), gaps
            assert not notify.having("STOPPING")
            proc.send_signal(signal.SIGTERM)
            stopping = await notify.wait("STOPPING")
            assert stopping["STOPPING"] == "1"
            assert await _exited(proc) == 0, _log_tail(log_path)
            assert "systemd watchdog: pinging every 0.5 s" in log_path.read_text()
    finally:
        notify.close()


async def test_sighup_refuses_a_bad_config_then_reloads_a_good_one(tmp_path: Path) -> None:
    web_port, lathe_port, mill_port = free_port(), free_port(), free_port()
    config = tmp_path / "gateway.yaml"
    lathe = _device("lathe-1", lathe_port)
    _write_config(config, web_port, [lathe])
    notify = Notifications(tmp_path / "notify.sock")
    log_path = tmp_path / "gw.log"
    try:
        async with (
            RegisterServer([Spindle(1450)], port=lathe_port),
            RegisterServer([Spindle(900)], port=mill_port),
            _gateway_process(config, notify, log_path) as proc,
        ):
            await notify.wait("READY")
            await _until(lambda: _gets_polled(web_port, "lathe-1-plc", 0), proc, log_path)

            # A typo in a tag type: refused, named by file, line and key; nothing restarts.
            text = config.read_text()
            assert text.count("type: uint16") == 2
            config.write_text(text.replace("type: uint16", "type: uint61", 1))
            line = 1 + text[: text.index("type: uint16")].count("\n")
            polls = (await _devices(web_port))["lathe-1-plc"]["polls"]
            proc.send_signal(signal.SIGHUP)
            await _until(lambda: _logged(log_path, "reload refused"), proc, log_path)
            await _until(lambda: _gets_polled(web_port, "lathe-1-plc", polls + 5), proc, log_path)
            out = log_path.read_text()
            assert f"reload refused: {config}: 1 error; the running gateway keeps its" in out
            assert f"reload refused: {config}:{line}: devices[0].tags[0].type: " in out, out
            assert "uint61" in out
            notify.drain()
            assert not notify.having("RELOADING")
            assert len(notify.having("READY")) == 1
            refused = notify.having("STATUS")[-1][1]
            assert refused["STATUS"].startswith("reload refused"), refused

            # A second machine: stopped and started again from the new file, same process.
            _write_config(config, web_port, [lathe, _device("mill-1", mill_port)])
            proc.send_signal(signal.SIGHUP)
            reloading = await notify.wait("RELOADING")
            ready = await notify.wait("READY", count=2)
            assert "MONOTONIC_USEC" in reloading
            assert ready["STATUS"] == "reloaded; 2 device(s), 4 tag(s); sinks: web", ready
            keys = [next(iter(m)) for _, m in notify.messages if "WATCHDOG" not in m]
            assert keys[-2:] == ["RELOADING", "READY"], notify.messages
            await _until(lambda: _gets_polled(web_port, "mill-1-plc", 0), proc, log_path)
            tags = await _get(web_port, "/api/tags?machine=mill-1")
            speed = {t["name"]: t for t in tags}["speed"]
            assert speed["value"] == 900, speed
            out = log_path.read_text()
            assert f"reloaded {config}: devices 1 -> 2; added mill-1-plc; sections" in out, out

            proc.send_signal(signal.SIGTERM)
            assert await _exited(proc) == 0, _log_tail(log_path)
            assert out.count("retrofit-gw ") >= 2
    finally:
        notify.close()


async def _gets_polled(web_port: int, device: str, more_than: int) -> bool:
    found = (await _devices(web_port)).get(device)
    return found is not None and found["state"] == "online" and found["good_polls"] > more_than


def _logged(path: Path, text: str) -> bool:
    return text in path.read_text(errors="replace")


def _listening(proc: psutil.Process) -> set[int]:
    return {c.laddr.port for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN}


async def test_a_reload_that_does_not_start_falls_back_to_the_running_config(
    tmp_path: Path,
) -> None:
    web_port, new_web_port, lathe_port = free_port(), free_port(), free_port()
    config = tmp_path / "gateway.yaml"
    lathe = _device("lathe-1", lathe_port)
    _write_config(config, web_port, [lathe])
    notify = Notifications(tmp_path / "notify.sock")
    log_path = tmp_path / "gw.log"
    # The new OPC UA port, held by someone else: listening, as another server would.
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = int(blocker.getsockname()[1])
        async with (
            RegisterServer([Spindle(1450)], port=lathe_port),
            _gateway_process(config, notify, log_path) as proc,
        ):
            await notify.wait("READY")
            await _until(lambda: _gets_polled(web_port, "lathe-1-plc", 0), proc, log_path)
            gw = psutil.Process(proc.pid)
            threads = gw.num_threads()
            assert _listening(gw) == {web_port}

            # Valid, but its gateway cannot start: the new page is up within milliseconds,
            # OPC UA fails seconds later. The page must be gone again after.
            opcua = {"host": "127.0.0.1", "port": taken, "allow_none": True}
            _write_config(config, new_web_port, [lathe], opcua=opcua)
            proc.send_signal(signal.SIGHUP)
            await notify.wait("RELOADING")
            ready = await notify.wait("READY", count=2, within=60)
            cause = f"OPC UA: cannot listen on 127.0.0.1:{taken}: Address already in use"
            assert ready["STATUS"].startswith(f"reload failed ({cause}"), ready
            assert ready["STATUS"].endswith(
                "; running the previous config; 1 device(s), 2 tag(s); sinks: web"
            ), ready
            statuses = [m["STATUS"] for _, m in notify.having("STATUS") if "READY" not in m]
            assert statuses[-1].startswith(f"reload failed: {cause}"), statuses
            assert statuses[-1].endswith("; restoring the previous config"), statuses
            polls = (await _devices(web_port))["lathe-1-plc"]["good_polls"]
            await _until(lambda: _gets_polled(web_port, "lathe-1-plc", polls), proc, log_path)
            out = log_path.read_text()
            assert f"status page on http://127.0.0.1:{new_web_port}/" in out
            assert f"reload failed: the new config of {config} did not start: {cause}" in out, out
            assert f"restored the previous config of {config} after the failed reload" in out
            # One line: a taken port needs no traceback (neither ours nor asyncua's).
            lines = out.splitlines()
            at = next(i for i, line in enumerate(lines) if "reload failed: the new" in line)
            assert lines[at + 1].startswith("20"), lines[at + 1]
            # Nothing of the failed generation is left: no listener, no thread; its port is free.
            assert _listening(gw) == {web_port}
            assert gw.num_threads() == threads
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind(("127.0.0.1", new_web_port))

            # The port is free now: the same file reloads as usual.
            blocker.close()
            proc.send_signal(signal.SIGHUP)
            ready = await notify.wait("READY", count=3, within=60)
            assert ready["STATUS"] == "reloaded; 1 device(s), 2 tag(s); sinks: opcua, web", ready
            await _until(lambda: _gets_polled(new_web_port, "lathe-1-plc", 0), proc, log_path)
            assert _listening(gw) == {new_web_port, taken}
            out = log_path.read_text()
            assert f"reloaded {config}: 1 device(s); sections changed: opcua (added), web" in out

            proc.send_signal(signal.SIGTERM)
            assert await _exited(proc) == 0, _log_tail(log_path)
    finally:
        blocker.close()
        notify.close()
