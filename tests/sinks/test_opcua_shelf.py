"""The OPC UA sink's shelf of the standard address space (``_StandardNodes``): made after a
start without one, used by the next start, and left out with one warning when it is damaged."""

from __future__ import annotations

import dbm
import json
import logging
import shutil
import threading
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
    _StandardNodes(data).make(threading.Event())
    return data / SHELF_NAME


def data_dir(loaded: LoadedConfig) -> Path:
    return Gateway(loaded).data_dir


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
                await wait_for(lambda: "wrote the standard address space" in caplog.text, 120)
                assert "from the shelf" not in caplog.text
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


async def test_cancelled_while_making_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(opcua, "SHELF_DELAY_S", 0.0)
    loaded = make_config(tmp_path, free_port(), {"m": free_port()})
    async with running(loaded):
        await wait_for(
            lambda: any(t.name.startswith("opcua-shelf") for t in threading.enumerate()), 10
        )
    assert not any(t.name.startswith("opcua-shelf") for t in threading.enumerate())
    assert [p.name for p in data_dir(loaded).iterdir() if "aspace" in p.name] == []


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
