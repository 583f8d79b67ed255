"""Shared fixtures. The autouse leak check fails any test that leaves a task or thread behind."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_port()


def _live_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.is_alive()}


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = _live_threads()
    yield
    # Executors and servers may need a moment to join their workers after shutdown.
    deadline = time.monotonic() + 2.0
    leaked: set[threading.Thread] = set()
    while time.monotonic() < deadline:
        gc.collect()
        leaked = {t for t in _live_threads() - before if not t.daemon or t.name != "asyncio_0"}
        if not leaked:
            return
        time.sleep(0.05)
    pytest.fail(f"test leaked threads: {sorted(t.name for t in leaked)}")


@pytest.fixture(autouse=True)
async def _no_leaked_tasks() -> AsyncIterator[None]:
    # Async autouse fixture: runs inside the test's event loop, so it sees the test's tasks.
    # pytest-asyncio may run set-up and tear-down of this fixture in different tasks.
    before = set(asyncio.all_tasks())
    yield
    leaked: set[asyncio.Task[object]] = set()
    for _ in range(20):
        me = asyncio.current_task()
        leaked = {t for t in asyncio.all_tasks() - before if t is not me and not t.done()}
        if not leaked:
            return
        await asyncio.sleep(0.05)
    names = sorted(t.get_name() for t in leaked)
    for t in leaked:
        t.cancel()
    pytest.fail(f"test leaked tasks: {names}")
