"""``retrofit-gw run`` as a service: systemd notifications, the watchdog, and SIGHUP reloads.

One task tree per process::

    serve
    ├── systemd[watchdog]      pings while the loop runs (see gateway.systemd)
    └── gateway[N]             one Gateway.run per config generation, one at a time

SIGHUP reads the same config file again. A bad file is refused with every issue logged
(file:line: key: message) and the running gateway is not touched. A good one stops the running
gateway the way SIGTERM would (drivers stop, the bus drains into the sinks, sinks close; the
MQTT buffer stays on disk) and starts a new one from it in the same process.

A new config can be valid and still fail to start: its OPC UA or web port is taken, its MQTT
buffer is locked, a TLS file is unreadable. Then the previous config, the last one that
started, is started again, with one error in the log and in systemd's STATUS; only if that
fails too does the process exit non-zero. Exiting at once would leave it to systemd's
Restart=, which restarts with the same file and fails the same way forever. A first start
that fails has nothing to go back to: the process exits non-zero, as before.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import pickle
import signal
import zlib
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from gateway.app import Gateway
from gateway.config import GatewayConfig, LoadedConfig, load_config
from gateway.errors import ConfigError, GatewayError
from gateway.sinks.base import Sink
from gateway.systemd import Notifier

__all__ = ["ConfigSummary", "OnStarted", "StartFn", "describe_changes", "serve"]

log = logging.getLogger("gateway.service")

#: Called by a generation once its sinks have started, with its gateway and sinks.
OnStarted = Callable[[Gateway, Sequence[Sink]], None]
#: Runs one gateway from a config until the event is set (``cli._run_gateway``).
StartFn = Callable[[LoadedConfig, asyncio.Event, OnStarted], Coroutine[Any, Any, None]]


_T = TypeVar("_T")


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


@dataclass(frozen=True)
class _Snapshot:
    """A config kept to be started again should the next one fail to start.

    Pickled and compressed (a generated config of 10k tags: 1.3 MB pickled, 40 KB compressed)
    instead of the ~1.2 KB a validated tag model takes, which the drivers release on purpose.
    Unpickled rather than validated again: the same objects come back, and nothing on disk
    is read (the file may already hold the config that failed). Made and restored in a
    thread, because both take a while with many tags.
    """

    path: Path
    summary: ConfigSummary
    blob: bytes | None
    #: Only when the config would not pickle: then it is kept as it is, at full size.
    kept: GatewayConfig | None = None

    @classmethod
    def take(cls, loaded: LoadedConfig, summary: ConfigSummary) -> _Snapshot:
        try:
            raw = pickle.dumps(loaded.config, pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            log.warning("keeping the config in memory as it is (it does not pickle: %s)", exc)
            return cls(loaded.path, summary, None, loaded.config)
        return cls(loaded.path, summary, zlib.compress(raw, 6))

    def restore(self) -> LoadedConfig:
        if self.blob is None:
            assert self.kept is not None
            return LoadedConfig(self.path, self.kept)
        # Our own bytes, made in this process from a validated config; never read from outside.
        config: GatewayConfig = pickle.loads(zlib.decompress(self.blob))  # noqa: S301
        return LoadedConfig(self.path, config)


async def _in_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` off the loop, which keeps polling and pinging the watchdog meanwhile. A
    pool of its own, joined here, rather than the loop's default executor, whose thread would
    outlive the call."""
    with ThreadPoolExecutor(1, thread_name_prefix="service") as pool:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _cause(exc: BaseException) -> str:
    """Why a generation did not start, in one line: the messages of the errors in the (nested)
    groups a TaskGroup raises, e.g. ``web: cannot listen on 127.0.0.1:8080: Address already in
    use``."""
    parts = []
    for leaf in _leaves(exc):
        text = str(leaf)
        if not isinstance(leaf, GatewayError):
            text = f"{type(leaf).__name__}: {text}" if text else type(leaf).__name__
        if text not in parts:
            parts.append(text)
    return "; ".join(parts)


def _is_environment(exc: BaseException) -> bool:
    """A port, a file, a lock: the machine's state, for which a traceback says nothing more."""
    return all(isinstance(leaf, GatewayError | OSError) for leaf in _leaves(exc))


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


def _load_and_snapshot(path: Path) -> tuple[LoadedConfig, _Snapshot]:
    loaded = load_config(path)
    return loaded, _Snapshot.take(loaded, ConfigSummary.of(loaded))


async def _load(path: Path) -> tuple[LoadedConfig, _Snapshot] | None:
    """The new config and its snapshot, or None after logging why it was refused."""
    try:
        # In a thread: a large config with CSV tables takes a while to parse on a Pi.
        loaded, snapshot = await _in_thread(_load_and_snapshot, path)
    except ConfigError as err:
        refused = err
    else:
        return loaded, snapshot
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


@dataclass
class _Outcome:
    """How a generation went: whether it started, and if not, why."""

    started: bool = False
    failure: BaseException | None = None


async def _generation(
    start: StartFn,
    loaded: LoadedConfig,
    stop: asyncio.Event,
    on_started: OnStarted,
    outcome: _Outcome,
) -> None:
    """One generation. A failure before it started is kept in ``outcome`` for the supervisor
    to answer (restore the previous config, or exit); a failure after it started is a bug
    and is raised, which ends the process through the TaskGroup, as before.

    Every resource of a generation is released by the time its ``start`` returns or raises
    (``Gateway.run`` closes every sink, started or not), so a failed one leaves nothing."""

    def started(gw: Gateway, sinks: Sequence[Sink]) -> None:
        outcome.started = True
        on_started(gw, sinks)

    try:
        await start(loaded, stop, started)
    except Exception as exc:
        if outcome.started:
            raise
        outcome.failure = exc


async def _supervise(
    tg: asyncio.TaskGroup,
    path: Path,
    first: LoadedConfig,
    stop: asyncio.Event,
    hup: asyncio.Event,
    start: StartFn,
    notifier: Notifier,
) -> None:
    pending: LoadedConfig | None = first
    # The running generation's config, and the last one that started: what a generation that
    # fails to start is replaced with. The first config's snapshot is made while it starts.
    current: _Snapshot | None = None
    previous: _Snapshot | None = None
    summary = ConfigSummary.of(first)
    del first
    announce: _Announce | None = None
    restoring = False
    generation = 0
    while True:
        assert pending is not None
        task_stop = asyncio.Event()
        outcome = _Outcome()
        task = tg.create_task(
            _generation(start, pending, task_stop, _announcer(notifier, announce), outcome),
            name=f"gateway[{generation}]",
        )
        if current is None:
            current = await _in_thread(_Snapshot.take, pending, summary)
        # The Gateway keeps only what it compiled; holding the config here would keep every
        # validated tag model alive until the next reload.
        pending = None
        reload: _Snapshot | None = None
        while pending is None:
            await _wait_first(task, stop, hup)
            if task.done():
                break
            if stop.is_set():
                notifier.stopping()
                task_stop.set()
                await asyncio.wait([task])
                if outcome.failure is not None:
                    raise outcome.failure
                return
            hup.clear()
            log.info("SIGHUP: reading %s again", path)
            result = await _load(path)
            if result is None:
                notifier.status(f"reload refused: {path} is invalid; running the previous config")
                continue
            pending, reload = result

        if reload is None:
            # Only a failure ends a generation on its own. After its start the TaskGroup
            # raises it; before, it is in the outcome.
            failure = outcome.failure
            if failure is None:
                return
            outcome.failure = None
            cause = _cause(failure)
            if previous is None or stop.is_set():
                # The first start has nobody to tell but the caller, which prints the error
                # and exits non-zero; after a reload, the log and systemd learn why too.
                if generation > 0:
                    if restoring:
                        log.error("the previous config did not start either: %s; exiting", cause)
                    else:
                        log.error("the gateway did not start: %s; exiting", cause)
                    notifier.status(f"failed to start: {cause}")
                raise failure
            log.error(
                "reload failed: the new config of %s did not start: %s; restoring the "
                "previous config",
                path,
                cause,
                exc_info=None if _is_environment(failure) else failure,
            )
            del failure
            notifier.status(f"reload failed: {cause}; restoring the previous config")
            current, previous = previous, None
            summary = current.summary
            pending = await _in_thread(current.restore)
            announce = _Announce(
                f"reload failed ({cause}); running the previous config",
                f"restored the previous config of {path} after the failed reload",
            )
            restoring = True
            generation += 1
            continue

        changes = describe_changes(summary, reload.summary)
        log.info("reloading %s: %s; stopping the running gateway", path, changes)
        notifier.reloading()
        task_stop.set()
        await asyncio.wait([task])
        if task.cancelled() or task.exception() is not None:
            return
        if outcome.started:
            previous = current
        elif outcome.failure is not None:
            # Failed to start while the reload was being read: the new config replaces it.
            log.error("the running gateway had failed to start: %s", _cause(outcome.failure))
            outcome.failure = None
        if stop.is_set():
            notifier.stopping()
            return
        current, summary = reload, reload.summary
        announce = _Announce("reloaded", f"reloaded {path}: {changes}")
        restoring = False
        generation += 1


@dataclass(frozen=True)
class _Announce:
    """What a generation says once it has started, when it is not the first."""

    status: str
    log: str


def _announcer(notifier: Notifier, announce: _Announce | None) -> OnStarted:
    """READY=1 once a generation's sinks are up; after a reload, also what happened."""

    def on_started(gw: Gateway, sinks: Sequence[Sink]) -> None:
        status = _status(gw, sinks)
        if announce is not None:
            log.info("%s", announce.log)
            status = f"{announce.status}; {status}"
        notifier.ready(status)

    return on_started
