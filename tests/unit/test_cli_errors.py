"""A start-up failure inside nested task groups is printed as its cause."""

from __future__ import annotations

import asyncio

import pytest

from gateway.cli import EXIT_DEVICE, EXIT_OK, _run_main
from gateway.errors import GatewayError


async def _nested_failure() -> None:
    async def fail() -> None:
        raise GatewayError("web: cannot listen on 127.0.0.1:8080: Address already in use")

    async def inner() -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(fail())

    async with asyncio.TaskGroup() as tg:
        tg.create_task(inner())


async def _fine() -> None:
    await asyncio.sleep(0)


def test_nested_group_prints_the_cause(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_main(_nested_failure) == EXIT_DEVICE
    err = capsys.readouterr().err
    assert err == "retrofit-gw: web: cannot listen on 127.0.0.1:8080: Address already in use\n"
    assert "TaskGroup" not in err


def test_clean_run_exits_ok() -> None:
    assert _run_main(_fine) == EXIT_OK
