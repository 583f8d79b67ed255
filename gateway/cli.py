"""``retrofit-gw``: check, once, schema, run, simulate, demo; read and scan for commissioning;
passwd and certs for logins and OPC UA trust.

Exit codes: 0 success, 1 a device could not be read (``once``, ``read``, ``scan``), 2 a bad
config or bad usage.
Nothing starts with a bad config.

Imports: each command imports what it needs inside its handler. The config models (pydantic,
PyYAML), the runtime, the certificates (cryptography), the simulator and the demo broker are
three quarters of the CLI's import time (0.4 of 0.55 s CPU on a PC, about ten times that under
qemu): ``--version`` and ``--help`` need none of them, and ``check``, or ``run`` of a config
without OPC UA, needs no cryptography. The sinks' libraries (asyncua, fastapi, paho) are
imported by ``gateway.app.build_sinks`` only when the config has their section.
tests/test_import_cost.py keeps it so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import getpass
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gateway
from gateway.errors import ConfigError, DeviceError, GatewayError

if TYPE_CHECKING:
    from gateway import service
    from gateway.certs import CertificateInfo

    # Only for the annotation: commission imports format_table from here.
    from gateway.commission import Endpoint
    from gateway.config import LoadedConfig
    from gateway.sinks.base import Sink

__all__ = ["main"]

EXIT_OK = 0
EXIT_DEVICE = 1
EXIT_CONFIG = 2

log = logging.getLogger("gateway.cli")


def _demo_config() -> Path:
    """The example config: in a checkout beside the package, else in the wheel's share dir."""
    candidates = [
        Path(gateway.__file__).resolve().parent.parent / "config" / "demo.yaml",
        Path(sys.prefix) / "share" / "retrofit-gateway" / "config" / "demo.yaml",
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError("config/demo.yaml not found beside the package or in " + sys.prefix)


def load_config(path: str | Path) -> LoadedConfig:
    """``gateway.config.load_config``, imported when a command first needs it (see the module
    docstring); raises its ``ConfigError``."""
    from gateway.config import load_config as load  # noqa: PLC0415

    return load(path)


def _print_config_error(path: str, err: ConfigError) -> None:
    n = len(err.issues)
    print(f"{path}: {n} error{'s' if n != 1 else ''}; nothing was started", file=sys.stderr)
    for issue in err.issues:
        print(f"  {issue}", file=sys.stderr)


def cmd_check(args: argparse.Namespace) -> int:
    from drivers.base import Describable  # noqa: PLC0415
    from gateway.app import Gateway  # noqa: PLC0415

    for path in args.config:
        try:
            loaded = load_config(path)
        except ConfigError as err:
            _print_config_error(path, err)
            return EXIT_CONFIG
        gw = Gateway(loaded)
        tags = len(gw.tags)
        print(f"{path}: OK: {len(gw.drivers)} device(s), {tags} tag(s)")

        for driver in gw.drivers:
            if isinstance(driver, Describable):
                for line in driver.describe_plan():
                    print(f"  {line}")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from gateway.config import json_schema  # noqa: PLC0415

    print(json.dumps(json_schema(), indent=2))
    return EXIT_OK


def cmd_asyncapi(args: argparse.Namespace) -> int:
    from gateway import asyncapi  # noqa: PLC0415 - only this command needs it
    from gateway.app import Gateway  # noqa: PLC0415

    try:
        loaded = load_config(args.config)
    except ConfigError as err:
        _print_config_error(args.config, err)
        return EXIT_CONFIG
    if loaded.config.mqtt is None and loaded.config.sparkplug is None:
        print(f"{args.config}: no mqtt: or sparkplug: section; no MQTT interface", file=sys.stderr)
        return EXIT_CONFIG
    doc = asyncapi.build(loaded.config, Gateway(loaded).tags)
    out = args.output
    as_json = args.format == "json" or (args.format is None and str(out).endswith(".json"))
    if as_json:
        text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    else:
        import yaml  # noqa: PLC0415

        text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=100)
    if out in (None, "-"):
        sys.stdout.write(text)
    else:
        Path(out).write_text(text, encoding="utf-8")
        print(f"{out}: AsyncAPI {doc['asyncapi']}, {len(doc['channels'])} channels")
    return EXIT_OK


def _fmt_value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
    return "\n".join(lines)


def cmd_once(args: argparse.Namespace) -> int:
    from gateway.app import Gateway  # noqa: PLC0415

    try:
        loaded = load_config(args.config)
    except ConfigError as err:
        _print_config_error(args.config, err)
        return EXIT_CONFIG
    gw = Gateway(loaded)
    results = asyncio.run(gw.poll_once())
    if args.json:
        for spec, r in results:
            print(
                json.dumps(
                    {
                        "machine": spec.machine,
                        "device": spec.device,
                        "tag": spec.name,
                        "value": r.value,
                        "unit": spec.unit,
                        "quality": r.quality.name.lower(),
                        "reason": r.reason.value,
                        "detail": r.detail,
                        "source_ts": r.source_ts,
                        "raw": list(r.raw),
                    }
                )
            )
    else:
        rows = []
        for spec, r in results:
            quality = r.quality.name.lower()
            if r.reason.value:
                quality += f" ({r.reason.value}{': ' + r.detail if r.detail else ''})"
            rows.append(
                [
                    spec.machine,
                    spec.name,
                    _fmt_value(r.value),
                    spec.unit or "",
                    quality,
                    " ".join(f"{x:04x}" for x in r.raw),
                    spec.source,
                ]
            )
        print(format_table(rows, ["MACHINE", "TAG", "VALUE", "UNIT", "QUALITY", "RAW", "SOURCE"]))
        for status in gw.statuses.values():
            if status.last_error:
                print(f"{status.name}: {status.state.value}: {status.last_error}", file=sys.stderr)
    failed = any(s.state.value != "online" for s in gw.statuses.values())
    return EXIT_DEVICE if failed else EXIT_OK


def _endpoint(args: argparse.Namespace) -> Endpoint:
    """The ``commission.Endpoint`` the link options name; raises its UsageError."""
    from gateway import commission as c  # noqa: PLC0415 - it imports format_table from here

    return c.Endpoint.from_options(
        host=args.host,
        port=args.port,
        serial=args.serial,
        baudrate=args.baudrate,
        parity=args.parity,
        stopbits=args.stopbits,
        bytesize=args.bytesize,
        framing=args.framing,
    )


def cmd_read(args: argparse.Namespace) -> int:
    from drivers.modbus.config import Addressing, Table  # noqa: PLC0415
    from gateway import commission as c  # noqa: PLC0415 - it imports format_table from here

    addressing = Addressing(args.addressing)
    # With modicon the reference names the table; an explicit --table must then agree.
    table = Table(args.table) if args.table else None
    if table is None and addressing is not Addressing.MODICON:
        table = Table.HOLDING
    try:
        endpoint = _endpoint(args)
        endpoint.check_unit(args.unit)
        table, address = c.plan_read(addressing, table, args.address, args.count, args.timeout)
    except c.UsageError as exc:
        print(f"retrofit-gw read: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        values = asyncio.run(
            c.read_span(endpoint, args.unit, table, address, args.count, args.timeout)
        )
    except DeviceError as exc:
        print(f"retrofit-gw read: {c.describe_device_error(exc, endpoint)}", file=sys.stderr)
        return EXIT_DEVICE
    found = [] if table.is_bits else c.interpret(values, addressing, table, args.address)
    result = c.ReadResult(
        endpoint, args.unit, table, address, values, addressing, args.address, found
    )
    if args.json:
        print(json.dumps(c.read_json(result), indent=2))
    else:
        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        print(c.format_read(result, color=color))
    return EXIT_OK


def cmd_scan(args: argparse.Namespace) -> int:
    from gateway import commission as c  # noqa: PLC0415 - it imports format_table from here

    try:
        spec = c.ScanSpec(
            endpoint=_endpoint(args),
            units=c.parse_units(args.units),
            tables=c.parse_tables(args.tables),
            start=args.start,
            end=args.end,
            block=args.block,
            timeout=args.timeout,
            max_requests=None if args.force else args.max_requests,
        )
        spec.check()
    except c.UsageError as exc:
        print(f"retrofit-gw scan: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    progress = c.Progress(sys.stderr)
    try:
        result = asyncio.run(c.scan(spec, progress))
    except DeviceError as exc:
        progress.done()
        print(f"retrofit-gw scan: {c.describe_device_error(exc, spec.endpoint)}", file=sys.stderr)
        return EXIT_DEVICE
    progress.done()
    if args.json:
        print(json.dumps(c.scan_json(result), indent=2))
    else:
        print(c.format_scan(result))
    return EXIT_CONFIG if result.stopped else EXIT_OK


def _install_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def _run_gateway(
    loaded: LoadedConfig, stop: asyncio.Event, on_started: service.OnStarted | None = None
) -> None:
    from gateway.app import FunctionSink, Gateway, build_sinks, log_sink  # noqa: PLC0415

    gw = Gateway(loaded)
    log.info(
        "retrofit-gw %s: %d device(s), %d tag(s) from %s",
        gateway.__version__,
        len(gw.drivers),
        len(gw.tags),
        loaded.path,
    )
    sinks: list[Sink] = build_sinks(gw)
    if not sinks:
        log.info("no mqtt/opcua/web section in the config: readings go to the log")
        sinks = [FunctionSink("log", log_sink)]
    started = None if on_started is None else functools.partial(on_started, gw)
    await gw.run(stop, sinks, on_started=started)


def _run_main(main: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """Run the event loop; an environment problem at start-up (a port in use) exits 1."""
    failed = False
    try:
        asyncio.run(main())
    except* GatewayError as group:
        failed = True
        # Nested task groups nest the groups: print the causes, not "unhandled errors in a
        # TaskGroup (1 sub-exception)".
        for exc in _leaves(group):
            print(f"retrofit-gw: {exc}", file=sys.stderr)
    return EXIT_DEVICE if failed else EXIT_OK


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from gateway import service  # noqa: PLC0415

    try:
        loaded = load_config(args.config)
    except ConfigError as err:
        _print_config_error(args.config, err)
        return EXIT_CONFIG

    async def main() -> None:
        stop = asyncio.Event()
        _install_signals(stop)
        # systemd notifications, the watchdog and SIGHUP reloads: see gateway.service.
        await service.serve(args.config, loaded, stop, _run_gateway)

    return _run_main(main)


def cmd_simulate(args: argparse.Namespace) -> int:
    from drivers.modbus.simulator import serve  # noqa: PLC0415

    async def main() -> None:
        stop = asyncio.Event()
        _install_signals(stop)
        print(
            f"simulating lathe-1 on {args.host}:{args.port} and mill-1 on "
            f"{args.host}:{args.port + 1} (Modbus TCP, unit 1); Ctrl-C stops",
            flush=True,
        )
        await serve(args.host, args.port, stop)

    asyncio.run(main())
    return EXIT_OK


def _with_broker(loaded: LoadedConfig, broker: str) -> LoadedConfig:
    from gateway.config import LoadedConfig, MqttSection  # noqa: PLC0415

    host, _, port = broker.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"--broker wants HOST:PORT, not {broker!r}")
    cfg = loaded.config
    mqtt = (cfg.mqtt or MqttSection()).model_copy(update={"host": host, "port": int(port)})
    return LoadedConfig(loaded.path, cfg.model_copy(update={"mqtt": mqtt}))


def _demo_banner(loaded: LoadedConfig, embedded: bool) -> str:
    cfg = loaded.config
    g = cfg.gateway
    lines = ["", "retrofit-gw demo: two simulated machines (lathe-1, mill-1) are being polled."]
    if cfg.web:
        lines.append(f"  status page   http://{cfg.web.host}:{cfg.web.port}/")
    if cfg.opcua:
        none = " (security None allowed: demo only)" if cfg.opcua.allow_none else ""
        lines.append(f"  OPC UA        opc.tcp://{cfg.opcua.host}:{cfg.opcua.port}{none}")
    if cfg.mqtt:
        m = cfg.mqtt
        kind = "embedded demo broker" if embedded else "broker"
        prefix = f"{m.topic_prefix}/{g.site}/{g.area}/{g.line}"
        lines.append(f"  MQTT          {m.host}:{m.port} ({kind}), topics {prefix}/#")
        lines.append(f"  try           mosquitto_sub -h {m.host} -p {m.port} -t '{prefix}/#' -v")
    lines.append("  Ctrl-C stops.")
    return "\n".join(lines) + "\n"


def cmd_demo(args: argparse.Namespace) -> int:
    from drivers.modbus.simulator import serve  # noqa: PLC0415
    from gateway.config import LoadedConfig  # noqa: PLC0415
    from gateway.demo_broker import DemoBroker  # noqa: PLC0415

    path = args.config or str(_demo_config())
    try:
        loaded = load_config(path)
    except ConfigError as err:
        _print_config_error(path, err)
        return EXIT_CONFIG
    if args.broker:
        loaded = _with_broker(loaded, args.broker)
    if not args.config:
        # The bundled config may sit in a read-only install dir: keep the demo's state
        # (OPC UA certificates) in the working directory instead.
        cfg = loaded.config
        data = str(Path.cwd() / "retrofit-demo-data")
        gw_section = cfg.gateway.model_copy(update={"data_dir": data})
        loaded = LoadedConfig(loaded.path, cfg.model_copy(update={"gateway": gw_section}))
    embedded = loaded.config.mqtt is not None and not args.broker
    if embedded and (section := loaded.config.mqtt) is not None:
        # The embedded broker (amqtt) speaks 3.1.1 and neither answers nor refuses an MQTT 5
        # CONNECT: "auto" would wait out its fallback timeout first.
        cfg = loaded.config
        mqtt = section.model_copy(update={"protocol": "3.1.1"})
        loaded = LoadedConfig(loaded.path, cfg.model_copy(update={"mqtt": mqtt}))

    async def main() -> None:
        stop = asyncio.Event()
        _install_signals(stop)
        if args.duration:
            asyncio.get_running_loop().call_later(args.duration, stop.set)
        sim_stop = asyncio.Event()
        async with contextlib.AsyncExitStack() as stack:
            if embedded:
                assert loaded.config.mqtt is not None
                await stack.enter_async_context(
                    DemoBroker(loaded.config.mqtt.host, loaded.config.mqtt.port)
                )
            async with asyncio.TaskGroup() as tg:
                tg.create_task(serve("127.0.0.1", args.sim_port, sim_stop), name="simulator")
                # Let the simulator's listeners come up so the first poll does not fail.
                await asyncio.sleep(0.3)
                print(_demo_banner(loaded, embedded), flush=True)
                try:
                    await _run_gateway(loaded, stop)
                finally:
                    sim_stop.set()

    return _run_main(main)


def cmd_passwd(args: argparse.Namespace) -> int:
    """Print the hash of a password, for ``password_hash:`` in a config."""
    from gateway.auth import hash_password  # noqa: PLC0415

    if args.stdin:
        line = sys.stdin.readline()
        # Only the line ending goes: spaces may be part of the password.
        password = line.removesuffix("\n").removesuffix("\r")
    else:
        try:
            password = getpass.getpass("Password: ")
            again = getpass.getpass("Again: ")
        except EOFError:
            print("retrofit-gw passwd: no password given", file=sys.stderr)
            return EXIT_CONFIG
        if password != again:
            print("retrofit-gw passwd: the two passwords differ; nothing printed", file=sys.stderr)
            return EXIT_CONFIG
    if not password:
        print("retrofit-gw passwd: an empty password is not allowed", file=sys.stderr)
        return EXIT_CONFIG
    hashed = hash_password(password)
    print(hashed)
    if not args.stdin:
        print(f'paste it into the config as:  password_hash: "{hashed}"', file=sys.stderr)
    return EXIT_OK


def _data_dir(args: argparse.Namespace) -> Path | None:
    """The config's data directory (--data-dir wins); None after printing a config error."""
    if args.data_dir:
        return Path(args.data_dir)
    try:
        loaded = load_config(args.config)
    except ConfigError as err:
        _print_config_error(args.config, err)
        return None
    path = Path(loaded.config.gateway.data_dir)
    return path if path.is_absolute() else loaded.path.parent / path


def _when(value: datetime | None) -> str:
    return "-" if value is None else f"{value:%Y-%m-%d %H:%M}"


def cmd_certs_list(args: argparse.Namespace) -> int:
    from gateway import certs  # noqa: PLC0415

    data_dir = _data_dir(args)
    if data_dir is None:
        return EXIT_CONFIG
    found = certs.list_certificates(data_dir)
    if args.json:
        for c in found:
            print(
                json.dumps(
                    {
                        "id": c.id,
                        "state": c.state,
                        "subject": c.subject,
                        "application_uri": c.application_uri,
                        "not_before": c.not_before.isoformat(),
                        "not_after": c.not_after.isoformat(),
                        "first_seen": c.first_seen.isoformat() if c.first_seen else None,
                        "sha256": c.sha256,
                        "path": str(c.path),
                    }
                )
            )
        return EXIT_OK
    own = certs.own_certificate(data_dir)
    if own is not None:
        print(f"server certificate: {own.application_uri}, SHA-256 {own.sha256}")
        print(f"  valid until {own.not_after:%Y-%m-%d}, in {own.path}")
    rows = [
        [
            c.state,
            c.id,
            c.common_name or c.subject,
            c.application_uri or "-",
            c.time_problem() or f"until {c.not_after:%Y-%m-%d}",
            _when(c.first_seen),
        ]
        for c in found
    ]
    pki = certs.pki_dir(data_dir)
    if not rows:
        print(f"no client certificates in {pki / 'trusted'} or {pki / 'rejected'}")
        return EXIT_OK
    header = ["STATE", "ID", "SUBJECT", "APPLICATION URI", "VALID", "FIRST SEEN (UTC)"]
    print(format_table(rows, header))
    if any(c.state == "rejected" for c in found):
        print(f"\ntrust one with: retrofit-gw certs trust {args.config} ID")
    return EXIT_OK


def _certs_move(args: argparse.Namespace, move: Callable[[Path, str], CertificateInfo]) -> int:
    from gateway import certs  # noqa: PLC0415

    data_dir = _data_dir(args)
    if data_dir is None:
        return EXIT_CONFIG
    try:
        info = move(data_dir, args.id)
    except certs.UnknownCertificate as exc:
        print(f"retrofit-gw certs {args.action}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{info.state}: {info.id} {info.common_name or info.subject} ({info.application_uri})")
    if info.state == "trusted":
        print("a running gateway accepts it at the client's next connection attempt")
    else:
        print("a running gateway closes its sessions within seconds and refuses new ones")
    return EXIT_OK


def cmd_certs_trust(args: argparse.Namespace) -> int:
    from gateway import certs  # noqa: PLC0415

    return _certs_move(args, certs.trust)


def cmd_certs_reject(args: argparse.Namespace) -> int:
    from gateway import certs  # noqa: PLC0415

    return _certs_move(args, certs.reject)


def _add_link_options(s: argparse.ArgumentParser) -> None:
    """--host or --serial, and how to talk there; defaults as in a device's config."""
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--host", help="Modbus TCP device, or serial device server (--framing rtu)")
    where.add_argument("--serial", metavar="PORT", help="serial port, e.g. /dev/ttyUSB0")
    s.add_argument("--port", type=int, help="TCP port with --host (default 502)")
    s.add_argument(
        "--framing",
        choices=["socket", "rtu", "ascii"],
        help="socket (Modbus TCP; default with --host), rtu (default with --serial; with "
        "--host: RTU frames through a serial device server) or ascii (--serial only)",
    )
    line = s.add_argument_group("serial line (--serial only; defaults as in the config)")
    line.add_argument("--baudrate", type=int, help="default 19200")
    line.add_argument("--parity", choices=["N", "E", "O"], help="default E")
    line.add_argument("--stopbits", type=int, choices=[1, 2], help="default 1")
    line.add_argument("--bytesize", type=int, choices=[7, 8], help="default 8; 7 for ASCII only")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="retrofit-gw",
        description="Retrofit 4.0 edge gateway: poll legacy machines, serve values on open "
        "standards.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {gateway.__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("check", help="validate config files and print the read plan")
    s.add_argument("config", nargs="+", help="YAML config file(s)")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("once", help="poll every device once and print a table")
    s.add_argument("config")
    s.add_argument("--json", action="store_true", help="one JSON object per tag")
    s.set_defaults(func=cmd_once)

    s = sub.add_parser("schema", help="print the config's JSON Schema (for editors)")
    s.set_defaults(func=cmd_schema)

    s = sub.add_parser(
        "asyncapi",
        help="print the AsyncAPI 3.0 document of a config's MQTT topics",
        description="The MQTT interface of this installation (every topic, payload schema, "
        "QoS and retain) as an AsyncAPI 3.0 document, for an MES team's tools.",
    )
    s.add_argument("config")
    s.add_argument("-o", "--output", help="write to this file (default stdout)")
    s.add_argument(
        "--format", choices=["yaml", "json"], help="default yaml; json for a *.json --output"
    )
    s.set_defaults(func=cmd_asyncapi)

    s = sub.add_parser("run", help="run the gateway")
    s.add_argument("config")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("simulate", help="serve a simulated lathe and mill over Modbus TCP")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=5020, help="lathe port; the mill gets port+1")
    s.set_defaults(func=cmd_simulate)

    s = sub.add_parser("demo", help="simulator and gateway together, no hardware needed")
    s.add_argument("--config", help="config to run instead of config/demo.yaml")
    s.add_argument("--duration", type=float, default=0, help="stop after N seconds")
    s.add_argument(
        "--broker",
        metavar="HOST:PORT",
        help="publish to this MQTT broker instead of the embedded demo broker",
    )
    s.add_argument(
        "--sim-port",
        type=int,
        default=5020,
        help="simulator ports (lathe; the mill gets +1); must match the config",
    )
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser(
        "read",
        help="read a span of one device ad hoc and print every interpretation",
        description="Read registers (or bits) once and print them raw and as every type and "
        "byte order, with the config line for each plausible reading. Read-only.",
    )
    s.add_argument("address", help="first address, written as --addressing says (e.g. 100, 40101)")
    s.add_argument("count", nargs="?", type=int, default=2, help="registers or bits (default 2)")
    _add_link_options(s)
    s.add_argument("--unit", type=int, default=1, help="unit id (default 1)")
    s.add_argument(
        "--table",
        choices=["holding", "input", "coil", "discrete_input"],
        help="default holding; with modicon addressing the reference names it",
    )
    s.add_argument(
        "--addressing", choices=["zero_based", "one_based", "modicon"], default="zero_based"
    )
    s.add_argument(
        "--timeout",
        type=float,
        default=1.0,
        help="seconds to wait for the answer (default 1; on --serial plus the frames' wire time)",
    )
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_read)

    s = sub.add_parser(
        "scan",
        help="find which unit ids answer and which address ranges they serve",
        description="Probe unit ids, then address ranges in blocks, with read requests only. "
        "A unit is present when it answers anything (an exception too), absent on a timeout. "
        "On a serial line every absent unit id costs one --timeout.",
    )
    _add_link_options(s)
    s.add_argument("--units", default="1-247", help="unit ids, e.g. 1-247 or 1,2,5 (default 1-247)")
    s.add_argument(
        "--tables",
        default="holding,input,coil,discrete_input",
        help="comma-separated tables to probe (default all four)",
    )
    s.add_argument("--start", type=int, default=0, help="first address (zero-based, default 0)")
    s.add_argument("--end", type=int, default=999, help="last address (default 999)")
    s.add_argument("--block", type=int, default=10, help="addresses per probe (default 10)")
    s.add_argument(
        "--timeout",
        type=float,
        default=0.3,
        help="seconds per request (default 0.3; on --serial plus the frames' wire time); "
        "each absent unit id costs one",
    )
    s.add_argument(
        "--max-requests",
        type=int,
        default=5000,
        help="refuse a scan needing more requests than this (default 5000)",
    )
    s.add_argument("--force", action="store_true", help="no request limit")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_scan)

    s = sub.add_parser(
        "passwd",
        help="hash a password for a config's password_hash:",
        description="Read a password (twice, without echo; or one line from stdin with "
        "--stdin) and print its scrypt hash, to paste into the config. The config holds the "
        "hash, never the password.",
    )
    s.add_argument("--stdin", action="store_true", help="read one line from stdin, no prompt")
    s.set_defaults(func=cmd_passwd)

    s = sub.add_parser(
        "certs",
        help="list, trust or reject OPC UA client certificates",
        description="OPC UA client certificates in <data_dir>/pki/trusted/ and "
        "<data_dir>/pki/rejected/. A refused client's certificate lands in rejected/; trusting "
        "it takes effect at its next connection, without a restart.",
    )
    certs_sub = s.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, func, about in (
        ("list", cmd_certs_list, "trusted and rejected certificates"),
        ("trust", cmd_certs_trust, "move a rejected certificate to trusted/"),
        ("reject", cmd_certs_reject, "move a trusted certificate to rejected/"),
    ):
        c = certs_sub.add_parser(action, help=about, description=about)
        c.add_argument("config", help="the gateway's config (it names the data directory)")
        if action == "list":
            c.add_argument("--json", action="store_true", help="one JSON object per certificate")
        else:
            c.add_argument("id", help="the certificate's id, as `certs list` shows it")
        c.add_argument("--data-dir", help="this data directory instead of the config's")
        c.set_defaults(func=func)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    logging.Formatter.converter = time.gmtime
    if args.log_level != "debug":
        # asyncua narrates every node it adds at INFO: thousands of lines at start-up.
        logging.getLogger("asyncua").setLevel(logging.WARNING)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        # `retrofit-gw check ... | head` closed the pipe: not an error of ours. Point stdout
        # at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    return code
