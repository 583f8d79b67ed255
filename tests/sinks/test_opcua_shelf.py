"""The OPC UA sink's shelf of the standard address space (``_StandardNodes``): made in a child
process after a start without one, used by the next start, and left out with one warning when
it is damaged. A child still at work when the sink stops, or past ``SHELF_TIMEOUT_S``, is killed
and reaped and leaves nothing behind."""

from __future__ import annotations

import asyncio
import dbm
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from asyncua import Client, ua

from gateway.app import Gateway
from gateway.config import LoadedConfig
from gateway.sinks import opcua
from gateway.sinks.opcua import SHELF_NAME, OpcUaSink, _StandardNodes
from tests.conftest import free_port
from tests.sinks.test_opcua import make_config, running, wait_for

SHELF_FILES = ("aspace", "aspace.db", "aspace.dat", "aspace.dir", "aspace.pag")


@pytest.fixture(scope="module")
def made_shelf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One shelf for the tests that damage a copy of it (making one takes seconds)."""
    data = tmp_path_factory.mktemp("shelf")
    _StandardNodes(data).make()
    return data / SHELF_NAME


def data_dir(loaded: LoadedConfig) -> Path:
    return Gateway(loaded).data_dir


def shelf_children() -> list[int]:
    """Our child processes making a shelf (zombies included: they are still in /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and b"_shelf_child" in cmdline:
            found.append(int(entry.name))
    return found


def shelf_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    return [w for w in warnings if "aspace" in w or "shelf" in w]


def is_gone(pid: int) -> bool:
    """Ended and reaped: no /proc entry (a zombie still has one, in state Z)."""
    return not Path(f"/proc/{pid}").exists()


async def standard_view(client: Client) -> list[object]:
    """What a client sees of the standard address space and of the server's own nodes."""
    server = client.nodes.server
    view: list[object] = [
        (await server.read_browse_name()).Name,
        await client.get_node(ua.ObjectIds.Server_NamespaceArray).read_value(),
        await client.get_node(ua.ObjectIds.Server_ServerStatus_State).read_value(),
        await client.get_node(ua.ObjectIds.Server_ServiceLevel).read_value(),
    ]
    for node in (client.nodes.base_object_type, client.nodes.base_data_type, server):
        children = await node.get_children()
        view.append(sorted(c.nodeid.to_string() for c in children))
    analog = client.get_node(ua.ObjectIds.AnalogItemType)
    names = [str((await p.read_browse_name()).Name) for p in await analog.get_properties()]
    view.append(sorted(names))
    return view


async def test_made_after_a_start_then_used_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(opcua, "SHELF_DELAY_S", 0.0)
    loaded = make_config(tmp_path, free_port(), {"m": free_port()})
    data = data_dir(loaded)
    data.mkdir(parents=True)
    old = data / "opcua-aspace-asyncua0.9.0-py3.9"  # an older asyncua's: removed once made
    old.mkdir()
    folder = data / SHELF_NAME
    views = []
    caplog.set_level(logging.INFO, logger="gateway.sinks.opcua")
    for start in range(2):
        async with running(loaded) as (_, sink):
            async with Client(sink.endpoint) as client:
                views.append(await standard_view(client))
                ns = sink.namespace_index
                site = await client.nodes.objects.get_child(f"{ns}:plant")
                views[-1].append(sorted(c.nodeid.to_string() for c in await site.get_children()))
            assert sink._server is not None
            nodes = sink._server.iserver.aspace._nodes
            if start == 0:
                assert isinstance(nodes, dict)  # built from asyncua's code
                await wait_for(shelf_children, 10)
                [child] = shelf_children()
                await wait_for(lambda: "wrote the standard address space" in caplog.text, 120)
                assert "from the shelf" not in caplog.text
                assert "(child process, peak " in caplog.text
                assert is_gone(child)
            else:
                assert not isinstance(nodes, dict)  # asyncua's LazyLoadingDict
                assert len(nodes) < 1000  # of ~6,000: only the nodes used are loaded
                assert "standard nodes from the shelf" in caplog.text
    assert views[0] == views[1]
    assert f"wrote the standard address space to {folder}" in caplog.text
    assert not old.exists()
    assert sorted(p.name for p in data.iterdir() if "aspace" in p.name) == [SHELF_NAME]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["asyncua"] in SHELF_NAME
    assert manifest["nodes"] > 5000
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert [w for w in warnings if "aspace" in w or "shelf" in w] == []


async def test_stopped_while_making_kills_the_child_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(opcua, "SHELF_DELAY_S", 0.0)
    loaded = make_config(tmp_path, free_port(), {"m": free_port()})
    data = data_dir(loaded)
    caplog.set_level(logging.INFO, logger="gateway.sinks.opcua")
    async with running(loaded):
        await wait_for(shelf_children, 10)
        [child] = shelf_children()
        # Mid-make: the child has made its temporary folder.
        await wait_for(lambda: any(".tmp-" in p.name for p in data.iterdir()), 30)
        assert not (data / SHELF_NAME).exists()
    assert is_gone(child)
    assert shelf_children() == []
    assert [p.name for p in data.iterdir() if "aspace" in p.name] == []
    assert "wrote the standard address space" not in caplog.text
    assert shelf_warnings(caplog) == []


async def test_a_child_past_the_timeout_is_killed_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(opcua, "SHELF_DELAY_S", 0.0)
    monkeypatch.setattr(opcua, "SHELF_TIMEOUT_S", 0.5)  # python alone takes longer to start
    loaded = make_config(tmp_path, free_port(), {"m": free_port()})
    data = data_dir(loaded)
    caplog.set_level(logging.INFO, logger="gateway.sinks.opcua")
    async with running(loaded) as (_, sink):
        await wait_for(shelf_children, 10)
        [child] = shelf_children()
        await wait_for(lambda: "cannot write" in caplog.text, 10)
        assert is_gone(child)
        assert sink._standard is not None
        assert sink._standard.wanted  # the next start tries again
    warnings = shelf_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert f"cannot write {data / SHELF_NAME}" in warnings[0]
    assert "not done after 0.5 s, killed" in warnings[0]
    assert [p.name for p in data.iterdir() if "aspace" in p.name] == []


async def test_the_child_stopped_by_sigterm_cleans_up_and_is_no_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """systemd stopping the service signals every process of its cgroup, the child too."""
    monkeypatch.setattr(opcua, "SHELF_DELAY_S", 0.0)
    loaded = make_config(tmp_path, free_port(), {"m": free_port()})
    data = data_dir(loaded)
    caplog.set_level(logging.INFO, logger="gateway.sinks.opcua")
    async with running(loaded):
        await wait_for(shelf_children, 10)
        [child] = shelf_children()
        await wait_for(lambda: any(".tmp-" in p.name for p in data.iterdir()), 30)
        os.kill(child, signal.SIGTERM)
        await wait_for(lambda: "was stopped" in caplog.text, 10)
        assert is_gone(child)
        assert [p.name for p in data.iterdir() if "aspace" in p.name] == []
    assert shelf_warnings(caplog) == []


def test_the_child_removes_its_folder_itself_on_sigterm(tmp_path: Path) -> None:
    tmp = tmp_path / f".{SHELF_NAME}.tmp-test"
    args = [sys.executable, "-P", "-c", opcua._SHELF_CHILD, opcua._PACKAGE_ROOT]
    child = subprocess.Popen(
        [*args, str(tmp_path), str(tmp)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while not tmp.exists():
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert os.getpriority(os.PRIO_PROCESS, child.pid) >= 10
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == opcua._SHELF_CHILD_STOPPED, err
    assert out == b""
    assert list(tmp_path.iterdir()) == []


def _refresh_manifest(folder: Path) -> None:
    """Sizes as they are now: damage that the size check does not see."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"] = {p.name: p.stat().st_size for p in folder.iterdir() if p != path}
    path.write_text(json.dumps(manifest))


def _grow(folder: Path) -> None:
    with next(folder / n for n in SHELF_FILES if (folder / n).exists()).open("ab") as f:
        f.write(b"x")


def _garble_node(folder: Path, nodeid: int) -> None:
    """A node init() writes, but which opening the shelf does not read, made unreadable."""
    with dbm.open(str(folder / "aspace"), "w") as db:
        key = ua.NodeId(nodeid).to_string().encode()
        assert key in db
        db[key] = b"not a pickle"
    _refresh_manifest(folder)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        pytest.param(_grow, "bytes, not", id="a file grew"),
        pytest.param(lambda f: (f / "manifest.json").unlink(), "no manifest", id="no manifest"),
        pytest.param(
            lambda f: (f / "manifest.json").write_text("{"), "JSONDecodeError", id="bad manifest"
        ),
        pytest.param(
            lambda f: _garble_node(f, ua.ObjectIds.RootFolder), "Unpickling", id="probe fails"
        ),
        pytest.param(
            lambda f: _garble_node(
                f, ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead
            ),
            "Unpickling",
            id="fails in init",
        ),
    ],
)
async def test_damaged_shelf_is_left_out_with_one_warning(
    tmp_path: Path,
    made_shelf: Path,
    caplog: pytest.LogCaptureFixture,
    damage: object,
    reason: str,
) -> None:
    loaded = make_config(tmp_path, free_port(), {"m": free_port()})
    folder = data_dir(loaded) / SHELF_NAME
    shutil.copytree(made_shelf, folder)
    damage(folder)  # type: ignore[operator]
    gw = Gateway(loaded)
    assert loaded.config.opcua is not None
    sink = OpcUaSink(gw, loaded.config.opcua)
    caplog.set_level(logging.INFO, logger="gateway.sinks.opcua")
    await sink.start()
    try:
        async with Client(sink.endpoint) as client:
            assert (await client.nodes.server.read_browse_name()).Name == "Server"
            state = client.get_node(ua.ObjectIds.Server_ServerStatus_State)
            assert await state.read_value() == ua.ServerState.Running
        assert sink._server is not None
        assert isinstance(sink._server.iserver.aspace._nodes, dict)
    finally:
        await sink.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    warnings = [w for w in warnings if "shelf" in w or "aspace" in w]
    assert len(warnings) == 1, warnings
    assert f"cannot use {folder}" in warnings[0], warnings[0]
    assert reason in warnings[0], warnings[0]
    assert "standard nodes built" in caplog.text
    # Removed, to be made again: the start after next is fast again.
    assert not folder.exists()
    assert sink._standard is not None
    assert sink._standard.wanted
    assert [p.name for p in folder.parent.iterdir() if "aspace" in p.name] == []


async def test_kill_reaps_the_child_even_when_cancelled_again() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sys, time; sys.stderr.write('x' * 500_000); time.sleep(60)",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,  # more than the pipe and the reader hold: drained
    )
    killing = asyncio.create_task(opcua._kill(proc))
    await asyncio.sleep(0)  # killed, now waiting for it
    killing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await killing
    assert proc.returncode == -signal.SIGKILL
    assert is_gone(proc.pid)
