"""``retrofit-gw run`` as a service: systemd notifications, the watchdog, and SIGHUP reloads.

One task tree per process::

    serve
    ├── systemd[watchdog]      pings while the loop runs (see gateway.systemd)
    └── gateway[N]             one Gateway.run per config generation, one at a time

SIGHUP reads the same config file again. A bad file is refused with every issue logged
(file:line: key: message) and the running gateway is not touched. A good one stops the running
gateway the way SIGTERM would (drivers stop, the bus drains into the sinks, sinks close; the
MQTT buffer stays on disk) and starts a new one from it in the same process.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.app import Gateway
from gateway.config import LoadedConfig, load_config
from gateway.errors import ConfigError
from gateway.sinks.base import Sink
from gateway.systemd import Notifier

__all__ = ["ConfigSummary", "OnStarted", "StartFn", "describe_changes", "serve"]

log = logging.getLogger("gateway.service")

#: Called by a generation once its sinks have started, with its gateway and sinks.
OnStarted = Callable[[Gateway, Sequence[Sink]], None]
#: Runs one gateway from a config until the event is set (``cli._run_gateway``).
StartFn = Callable[[LoadedConfig, asyncio.Event, OnStarted], Coroutine[Any, Any, None]]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class ConfigSummary:
    """Digests of a config's sections and devices: enough to say what a reload changed
    without keeping the old config (and its tag models) alive."""

    sections: dict[str, str | None]
    devices: dict[str, str]

    @classmethod
    def of(cls, loaded: LoadedConfig) -> ConfigSummary:
        cfg = loaded.config
        sections: dict[str, str | None] = {}
        for name in type(cfg).model_fields:
            if name in {"devices", "version"}:
                continue
            value = getattr(cfg, name)
            sections[name] = None if value is None else _digest(value.model_dump_json())
        devices = {d.name: _digest(d.model_dump_json()) for d in cfg.devices}
        return cls(sections, devices)


def describe_changes(old: ConfigSummary, new: ConfigSummary) -> str:
    """What a reload changed, coarsely: device count and names, and which sections."""
    parts = []
    if len(old.devices) == len(new.devices):
        parts.append(f"{len(new.devices)} device(s)")
    else:
        parts.append(f"devices {len(old.devices)} -> {len(new.devices)}")
    added = sorted(new.devices.keys() - old.devices.keys())
    removed = sorted(old.devices.keys() - new.devices.keys())
    changed = sorted(
        n for n in new.devices.keys() & old.devices.keys() if old.devices[n] != new.devices[n]
    )
    for label, names in (("added", added), ("removed", removed), ("changed", changed)):
        if names:
            parts.append(f"{label} {', '.join(names)}")
    sections = []
    for name in sorted(old.sections.keys() | new.sections.keys()):
        before, after = old.sections.get(name), new.sections.get(name)
        if before == after:
            continue
        if before is None:
            sections.append(f"{name} (added)")
        elif after is None:
            sections.append(f"{name} (removed)")
        else:
            sections.append(name)
    parts.append("sections changed: " + (", ".join(sections) if sections else "none"))
    return "; ".join(parts)


def _status(gw: Gateway, sinks: Sequence[Sink]) -> str:
    names = ", ".join(s.name for s in sinks) or "none"
    return f"{len(gw.drivers)} device(s), {len(gw.tags)} tag(s); sinks: {names}"


async def _wait_first(task: asyncio.Task[None], *events: asyncio.Event) -> None:
    """Until the task ends or one of the events is set. Never raises the task's error: its
    TaskGroup does, once."""
    waiters = [asyncio.create_task(e.wait(), name="service[wait]") for e in events]
    try:
        await asyncio.wait([task, *waiters], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


async def _load(path: Path) -> tuple[LoadedConfig, ConfigSummary] | None:
    """The new config, or None after logging why it was refused."""
    try:
        # In a thread: a large config with CSV tables takes a while to parse on a Pi, and the
        # loop keeps polling and pinging the watchdog meanwhile. A pool of its own, joined
        # here, rather than the loop's default executor, whose thread would outlive the reload.
        with ThreadPoolExecutor(1, thread_name_prefix="config-reload") as pool:
            loaded = await asyncio.get_running_loop().run_in_executor(pool, load_config, path)
    except ConfigError as err:
        refused = err
    else:
        return loaded, ConfigSummary.of(loaded)
    # No traceback: the issues say all there is to say, as `retrofit-gw check` would.
    n = len(refused.issues)
    log.error(
        "reload refused: %s: %d error%s; the running gateway keeps its config",
        path,
        n,
        "s" if n != 1 else "",
    )
    for issue in refused.issues:
        log.error("reload refused: %s", issue)
    return None


async def serve(
    path: str | Path,
    loaded: LoadedConfig,
    stop: asyncio.Event,
    start: StartFn,
    notifier: Notifier | None = None,
) -> None:
    """Run ``loaded`` until ``stop`` is set, reloading ``path`` on SIGHUP."""
    path = Path(path)
    notifier = Notifier.from_env() if notifier is None else notifier
    loop = asyncio.get_running_loop()
    hup = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, hup.set)
    quit_watchdog = asyncio.Event()
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(notifier.run_watchdog(quit_watchdog), name="systemd[watchdog]")
            try:
                await _supervise(tg, path, loaded, stop, hup, start, notifier)
            finally:
                quit_watchdog.set()
    finally:
        loop.remove_signal_handler(signal.SIGHUP)


async def _supervise(
    tg: asyncio.TaskGroup,
    path: Path,
    first: LoadedConfig,
    stop: asyncio.Event,
    hup: asyncio.Event,
    start: StartFn,
    notifier: Notifier,
) -> None:
    summary = ConfigSummary.of(first)
    pending: LoadedConfig | None = first
    del first
    changes: str | None = None
    generation = 0
    while pending is not None:
        task_stop = asyncio.Event()
        task = tg.create_task(
            start(pending, task_stop, _announcer(notifier, path, changes)),
            name=f"gateway[{generation}]",
        )
        # The Gateway keeps only what it compiled; holding the config here would keep every
        # validated tag model alive until the next reload.
        pending = None
        while pending is None:
            await _wait_first(task, stop, hup)
            if task.done():
                # Only a failure ends a generation on its own; the TaskGroup raises it.
                return
            if stop.is_set():
                notifier.stopping()
                task_stop.set()
                await asyncio.wait([task])
                return
            hup.clear()
            log.info("SIGHUP: reading %s again", path)
            result = await _load(path)
            if result is None:
                notifier.status(f"reload refused: {path} is invalid; running the previous config")
                continue
            pending, new_summary = result
        changes = describe_changes(summary, new_summary)
        summary = new_summary
        log.info("reloading %s: %s; stopping the running gateway", path, changes)
        notifier.reloading()
        task_stop.set()
        await asyncio.wait([task])
        if task.cancelled() or task.exception() is not None:
            return
        if stop.is_set():
            notifier.stopping()
            return
        generation += 1


def _announcer(notifier: Notifier, path: Path, changes: str | None) -> OnStarted:
    """READY=1 once a generation's sinks are up; after a reload, also the "reloaded" line."""

    def on_started(gw: Gateway, sinks: Sequence[Sink]) -> None:
        status = _status(gw, sinks)
        if changes is not None:
            log.info("reloaded %s: %s", path, changes)
            status = f"reloaded; {status}"
        notifier.ready(status)

    return on_started
