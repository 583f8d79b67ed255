"""The runtime: compile a validated config into drivers and runners, and run them as one tree.

Start order: sinks first (they subscribe before the first value exists), then drivers.
Stop order: drivers first (each finishes its poll in flight, bounded by its poll timeout),
then the bus is closed so that sinks drain what is queued, then sinks end.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivers import plugins
from drivers.base import Describable, Diagnosable, Driver
from gateway.bus import Bus, Subscription
from gateway.clock import ClockWatch
from gateway.config import GatewayConfig, LoadedConfig
from gateway.model import Reading, TagKey, TagSpec
from gateway.runner import RETRIABLE, Backoff, DeviceRunner
from gateway.sinks.base import Sink
from gateway.status import DeviceStatus
from gateway.writes import AuditLog, WriteResult, WriteService

__all__ = ["FunctionSink", "Gateway", "build_driver", "build_sinks", "log_sink"]

log = logging.getLogger("gateway")

#: A consumer of one subscription, for tests and the log sink: runs until the queue ends.
SinkFn = Callable[[Subscription], Coroutine[Any, Any, None]]


class FunctionSink:
    """Adapts a plain ``async def consume(sub)`` to the Sink protocol."""

    def __init__(self, name: str, fn: SinkFn) -> None:
        self.name = name
        self._fn = fn

    async def start(self) -> None:
        pass

    async def run(self, sub: Subscription) -> None:
        await self._fn(sub)

    async def close(self) -> None:
        pass


def build_sinks(gw: Gateway) -> list[Sink]:
    """The sinks the config asks for. Imported lazily: asyncua alone takes seconds on a Pi."""
    cfg = gw.config
    sinks: list[Sink] = []
    if cfg.opcua is not None:
        from gateway.sinks.opcua import OpcUaSink  # noqa: PLC0415

        sinks.append(OpcUaSink(gw, cfg.opcua))
    if cfg.mqtt is not None:
        from gateway.sinks.mqtt import MqttSink  # noqa: PLC0415

        sinks.append(MqttSink(gw, cfg.mqtt))
    if cfg.sparkplug is not None:
        from gateway.sinks.sparkplug import SparkplugSink  # noqa: PLC0415

        sinks.append(SparkplugSink(gw, cfg.sparkplug))
    if cfg.web is not None:
        from gateway.sinks.web import WebSink  # noqa: PLC0415

        sinks.append(WebSink(gw, cfg.web))
    return sinks


def build_driver(device: Any) -> Driver:
    """Resolve ``device.driver`` through the registry (built-in drivers, then installed
    driver plugins) and build the driver from its validated config."""
    return plugins.factory(device.driver)(device)


#: Every write to a machine, refused or done: one JSON object per line, in the data directory.
AUDIT_FILE = "audit.jsonl"


@dataclass
class Gateway:
    """The compiled runtime graph of one config. Build it, then ``await run(stop)``."""

    loaded: LoadedConfig
    bus: Bus = field(init=False)
    drivers: list[Driver] = field(init=False, default_factory=list)
    runners: list[DeviceRunner] = field(init=False, default_factory=list)
    statuses: dict[str, DeviceStatus] = field(init=False, default_factory=dict)
    started_at: float = field(init=False, default_factory=time.time)
    health: dict[str, dict[str, object]] = field(init=False, default_factory=dict)
    #: Probed once here (adjtimex, else a bounded timedatectl call), checked every second.
    clock: ClockWatch = field(init=False, default_factory=ClockWatch)
    writes: WriteService = field(init=False)

    def __post_init__(self) -> None:
        cfg = self.loaded.config
        self.bus = Bus(cfg.bus.queue_size)
        now = time.time()
        for device in cfg.devices:
            if not device.enabled:
                log.info("device %s is disabled in the config; not polled", device.name)
                continue
            driver = build_driver(device)
            endpoint = getattr(driver, "endpoint", "")
            status = DeviceStatus(device.name, device.machine, device.driver, endpoint)
            self.bus.register(driver.tags, now)
            self.drivers.append(driver)
            self.statuses[device.name] = status
            if isinstance(driver, Diagnosable):
                status.details = driver.details
            brk = cfg.breaker
            self.runners.append(
                DeviceRunner(
                    driver,
                    self.bus,
                    status,
                    connect_timeout=device.connect_timeout,
                    backoff=Backoff(base=brk.open_min, cap=brk.open_max),
                    failures_to_open=brk.failures,
                )
            )
        self.writes = WriteService(
            {t.key: t for t in self.tags},
            {d.name: d for d in self.drivers},
            self.bus.latest,
            AuditLog(self.data_dir / AUDIT_FILE),
        )
        # Drivers keep what they compiled; release the validated tag models (see driver docs).
        slim = [d.model_copy(update={"tags": []}) for d in cfg.devices]
        self.loaded = LoadedConfig(self.loaded.path, cfg.model_copy(update={"devices": slim}))

    async def write(self, key: TagKey, value: object, *, user: str, origin: str) -> WriteResult:
        """Write one tag on its machine, for any sink: validated, read back, audited."""
        return await self.writes.write(key, value, user=user, origin=origin)

    @property
    def audit_recent(self) -> Sequence[Mapping[str, object]]:
        return self.writes.audit.recent

    def audit_refusal(
        self, key: str, value: object, *, user: str, origin: str, code: str, detail: str
    ) -> None:
        """For sinks, which see the runtime and not the write service: see
        :meth:`WriteService.audit_refusal`."""
        self.writes.audit_refusal(key, value, user=user, origin=origin, code=code, detail=detail)

    @property
    def tags(self) -> list[TagSpec]:
        return [t for d in self.drivers for t in d.tags]

    @property
    def config(self) -> GatewayConfig:
        return self.loaded.config

    @property
    def data_dir(self) -> Path:
        """State lives beside the config unless the config names an absolute path."""
        path = Path(self.config.gateway.data_dir)
        return path if path.is_absolute() else self.loaded.path.parent / path

    def log_plan(self) -> None:
        for driver in self.drivers:
            if isinstance(driver, Describable):
                for line in driver.describe_plan():
                    log.info("plan %s", line)

    async def run(
        self,
        stop: asyncio.Event,
        sinks: Sequence[Sink | tuple[str, SinkFn]] = (),
        *,
        on_started: Callable[[Sequence[Sink]], None] | None = None,
    ) -> None:
        """Run until ``stop`` is set. A device error never ends this; a bug does, loudly.

        ``on_started`` is called once every sink has started, before the first poll: the
        moment a service manager may be told the gateway is ready.
        """
        started = [s if not isinstance(s, tuple) else FunctionSink(*s) for s in sinks]
        self.log_plan()
        try:
            await self._start_sinks(started)
            if on_started is not None:
                on_started(started)
            # Everything built so far (the compiled plan, OPC UA's address space: over 500k
            # objects with 10k tags) lives until shutdown. Freezing it keeps the collector from
            # re-scanning it on every full collection while values churn.
            gc.collect()
            gc.freeze()
            async with asyncio.TaskGroup() as tg:
                for sink in started:
                    tg.create_task(
                        sink.run(self.bus.subscribe(sink.name)), name=f"sink[{sink.name}]"
                    )
                driver_tasks = [
                    tg.create_task(runner.run(stop), name=f"driver[{runner.driver.name}]")
                    for runner in self.runners
                ]

                async def close_bus_after_drivers() -> None:
                    if driver_tasks:
                        await asyncio.wait(driver_tasks)
                    self.bus.close()

                tg.create_task(close_bus_after_drivers(), name="bus[close-after-drivers]")
                tg.create_task(self._watch_clock(stop), name="clock[watch]")
        finally:
            gc.unfreeze()
            # Reverse order of start; each close is idempotent and safe after a failed start.
            for sink in reversed(started):
                try:
                    await sink.close()
                except Exception:
                    log.exception("closing sink %s failed", sink.name)
        log.info("gateway stopped")

    async def _watch_clock(self, stop: asyncio.Event) -> None:
        """Once a second: is the clock synchronised, did it step? For the page and the MQTT
        buffer, which re-bases what it stamped before a step."""
        clock = self.clock
        self.health["clock"] = clock.as_dict()
        if clock.synced is False:
            log.warning(
                "the system clock is not synchronised (no NTP yet?): readings are marked "
                "clock_synced false until it is, and re-based when it steps"
            )
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await stop.wait()
            clock.check()
            self.health["clock"] = clock.as_dict()

    @staticmethod
    async def _start_sinks(sinks: Sequence[Sink]) -> None:
        # Concurrently: the OPC UA server's start-up is slow on a Pi and must not delay MQTT.
        t0 = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            for sink in sinks:
                tg.create_task(sink.start(), name=f"start[{sink.name}]")
        if sinks:
            log.info(
                "sinks started in %.2f s: %s",
                time.monotonic() - t0,
                ", ".join(s.name for s in sinks),
            )

    async def poll_once(self) -> list[tuple[TagSpec, Reading]]:
        """Connect, poll every group of every device once, close. For ``retrofit-gw once``."""

        async def one(runner: DeviceRunner) -> None:
            try:
                await runner.connect()
                for group in range(len(runner.driver.groups)):
                    await runner.poll(group)
            except RETRIABLE as exc:
                await runner.fail(exc)
            finally:
                await runner.driver.close()

        async with asyncio.TaskGroup() as tg:
            for runner in self.runners:
                tg.create_task(one(runner), name=f"once[{runner.driver.name}]")
        latest = self.bus.latest
        return [(spec, latest[spec.key]) for spec in self.tags]


async def log_sink(sub: Subscription) -> None:
    """The sink of ``retrofit-gw run`` until the real sinks exist: one log line per batch."""
    out = logging.getLogger("gateway.readings")
    async for batch in sub:
        if out.isEnabledFor(logging.INFO):
            out.info("%s", "  ".join(_short(r) for r in batch))


def _short(r: Reading) -> str:
    value = "-" if r.value is None else (f"{r.value:g}" if isinstance(r.value, float) else r.value)
    flag = "" if r.good else f"[{r.quality.name.lower()}:{r.reason.value}]"
    return f"{r.key}={value}{flag}"
