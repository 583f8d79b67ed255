"""Driver plugins: a driver shipped in its own distribution and found through an entry point.

A plugin distribution declares, in its ``pyproject.toml``::

    [project.entry-points."retrofit_gateway.drivers"]
    my_proto = "my_package.driver:describe"

``describe`` takes no arguments and returns a ``DriverPlugin``: the driver's name (the entry
point's name, which is also the config's ``driver:`` value), its config model (a
``PluginDevice`` subclass with ``driver: Literal["my_proto"]``), the factory that builds a
``drivers.base.Driver`` from one validated device, and optionally a cross-check.

The gateway reads the entry points once per process (``installed()``). A plugin that cannot
be imported, whose ``describe`` fails or returns something else than a valid ``DriverPlugin``,
whose name is a built-in driver's or is claimed by another entry point too, is *refused*: it
is logged as a warning and skipped, and a config that names its driver fails validation with
that reason. A config that does not name it is unaffected.

This module is the plugin author's surface (``DriverPlugin``, ``PluginDevice``,
``PluginTag``) and the runtime's registry (``installed``, ``factory``). Like every driver
module it never imports a sink.
"""

from __future__ import annotations

import collections.abc
import functools
import importlib
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Annotated, Any, Generic, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field

import drivers
from drivers.base import Driver

__all__ = [
    "DATATYPES",
    "GROUP",
    "DriverPlugin",
    "Issues",
    "PluginDevice",
    "PluginTag",
    "Plugins",
    "Refused",
    "discover",
    "factory",
    "installed",
]

#: The entry point group a plugin distribution declares its drivers in.
GROUP = "retrofit_gateway.drivers"

#: A ``driver:`` value: what the built-in names look like.
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
#: What the runtime uses of a ``drivers.base.Driver`` (checked on every plugin-built driver).
_DRIVER_MEMBERS = ("name", "tags", "groups", "connect", "read", "poll_timeout", "close")
#: The ``TagSpec.datatype`` values the sinks know (the Modbus driver's data types).
DATATYPES = frozenset(
    {"bool", "bit", "int16", "uint16", "int32", "uint32", "int64", "uint64"}
    | {"float32", "float64", "bcd16", "bcd32", "string"}
)

log = logging.getLogger(__name__)

_Name = Annotated[str, Field(min_length=1, max_length=64)]
_Seconds = Annotated[float, Field(gt=0, le=86_400)]

#: A cross-check's findings: ``(location under the device, message)`` pairs, as the built-in
#: drivers' ``check_device`` return them, e.g. ``(("tags", 2, "min"), "larger than max")``.
Issues = Iterable[tuple[tuple[str | int, ...], str]]


class PluginTag(BaseModel):
    """Base of a plugin's tag model: the gateway needs each tag's ``name``.

    Subclass it and add the tag's own keys. Unknown keys stay errors (``extra="forbid"``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: _Name


class PluginDevice(BaseModel):
    """Base of a plugin's device model: the keys every device has, whatever its protocol.

    The gateway's cross-check (unique names, timeout shorter than the interval, at least one
    tag) and runtime (``enabled``, ``connect_timeout``) rely on them. A subclass narrows
    ``driver`` to ``Literal["<entry point name>"]``, narrows ``tags`` to a list of its
    ``PluginTag`` subclass, and adds its own keys; it must keep ``extra="forbid"``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Narrowed to one Literal by each plugin; declared here so that it comes first.
    driver: str = Field(
        description="The entry point's name; each plugin's model narrows it to one `Literal`."
    )
    name: _Name
    machine: _Name = Field(description="The machine this device belongs to, e.g. lathe-3.")
    enabled: bool = True
    timeout: _Seconds = Field(
        default=0.5, description="Seconds to wait for one response; shorter than `interval`."
    )
    connect_timeout: _Seconds = Field(default=3.0, description="Seconds to wait for a connect.")
    interval: _Seconds = Field(default=1.0, description="Poll interval in seconds.")
    tags: Sequence[PluginTag] = Field(default_factory=list)


D = TypeVar("D", bound=PluginDevice)


@dataclass(frozen=True)
class DriverPlugin(Generic[D]):
    """What a plugin's ``describe()`` returns.

    ``factory(device)`` builds the driver of one validated device (it must not touch the
    device: ``retrofit-gw check`` builds every driver); ``check(device)``, if given, returns
    the driver's own cross-checks as ``(location under the device, message)`` pairs.
    """

    name: str
    model: type[D]
    factory: Callable[[D], Driver]
    check: Callable[[D], Issues] | None = None


@dataclass(frozen=True)
class Refused:
    """A plugin entry point the gateway could not use, and why."""

    name: str
    #: ``my_proto = my_package.driver:describe (from my-plugin 0.1)``
    origin: str
    reason: str

    def __str__(self) -> str:
        return f"driver plugin '{self.name}' ({self.origin}) is refused: {self.reason}"


@dataclass(frozen=True)
class Plugins:
    """The plugins of one installation: the usable ones, and the refused ones by name."""

    loaded: Mapping[str, DriverPlugin[Any]]
    refused: Mapping[str, Refused]


def discover(points: Iterable[EntryPoint]) -> Plugins:
    """Load and check every entry point (importing its module). Never raises for a plugin's
    fault: a faulty plugin ends up in ``refused`` with the reason."""
    by_name: dict[str, list[EntryPoint]] = {}
    for ep in points:
        by_name.setdefault(ep.name, []).append(ep)
    loaded: dict[str, DriverPlugin[Any]] = {}
    refused: dict[str, Refused] = {}
    for name, eps in sorted(by_name.items()):
        if len(eps) > 1:
            others = "; ".join(_origin(ep) for ep in eps)
            refused[name] = Refused(
                name, others, "the name is claimed by several entry points; uninstall all but one"
            )
            continue
        ep = eps[0]
        if name in drivers.BUILTIN:
            refused[name] = Refused(
                name,
                _origin(ep),
                f"'{name}' is a built-in driver; a plugin needs a name of its own",
            )
            continue
        try:
            loaded[name] = _load(ep)
        except _Invalid as exc:
            refused[name] = Refused(name, _origin(ep), str(exc))
    return Plugins(loaded, refused)


@functools.cache
def installed() -> Plugins:
    """The plugins of this installation, discovered once per process.

    Each refused plugin is logged as a warning here; a config that names it is refused by
    the config loader with the same reason.
    """
    plugins = discover(entry_points(group=GROUP))
    for refused in plugins.refused.values():
        log.warning("%s; skipped", refused)
    return plugins


def factory(name: str) -> Callable[[Any], Driver]:
    """The factory of driver ``name``: a built-in one (imported now) or a plugin's."""
    target = drivers.BUILTIN.get(name)
    if target is not None:
        module_name, _, attr = target.partition(":")
        built_in: Callable[[Any], Driver] = getattr(importlib.import_module(module_name), attr)
        return built_in
    plugin = installed().loaded.get(name)
    if plugin is None:
        # The config loader only lets known drivers through: this is a programming error.
        raise KeyError(f"no driver '{name}' (built in or plugin)")
    return functools.partial(_build, plugin)


def _build(plugin: DriverPlugin[Any], device: Any) -> Driver:
    try:
        driver = plugin.factory(device)
    except Exception as exc:
        exc.add_note(f"raised by the factory of driver plugin '{plugin.name}'")
        raise
    missing = [m for m in _DRIVER_MEMBERS if not hasattr(driver, m)]
    if missing:
        raise TypeError(
            f"driver plugin '{plugin.name}': its factory returned {type(driver).__name__}, "
            f"which lacks {', '.join(missing)} of the drivers.base.Driver protocol"
        )
    for spec in driver.tags:
        if spec.datatype not in DATATYPES:
            raise TypeError(
                f"driver plugin '{plugin.name}': tag {spec.key} has datatype "
                f"{spec.datatype!r}; the gateway knows {', '.join(sorted(DATATYPES))}"
            )
    return driver


class _Invalid(Exception):
    """Why one entry point cannot be used (becomes ``Refused.reason``)."""


def _origin(ep: EntryPoint) -> str:
    dist = ep.dist
    source = f" (from {dist.name} {dist.version})" if dist is not None else ""
    return f"{ep.name} = {ep.value}{source}"


def _load(ep: EntryPoint) -> DriverPlugin[Any]:
    name = ep.name
    if not _NAME.fullmatch(name):
        raise _Invalid(
            "the entry point name must be lower-case letters, digits and _, starting with a "
            "letter (it is the config's `driver:` value)"
        )
    try:
        describe = ep.load()
    except Exception as exc:
        raise _Invalid(f"cannot import it: {type(exc).__name__}: {exc}") from exc
    if not callable(describe):
        raise _Invalid(f"{ep.value} is a {type(describe).__name__}, not a function")
    try:
        plugin = describe()
    except Exception as exc:
        raise _Invalid(f"{ep.value}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(plugin, DriverPlugin):
        raise _Invalid(
            f"{ep.value}() returned a {type(plugin).__name__}, not a drivers.plugins.DriverPlugin"
        )
    if plugin.name != name:
        raise _Invalid(
            f"{ep.value}() describes driver '{plugin.name}', but the entry point is named "
            f"'{name}'; they must be the same"
        )
    _check_model(plugin.model, name)
    if not callable(plugin.factory):
        raise _Invalid("the DriverPlugin's factory is not callable")
    if plugin.check is not None and not callable(plugin.check):
        raise _Invalid("the DriverPlugin's check is not callable")
    return plugin


def _check_model(model: object, name: str) -> None:
    if not (isinstance(model, type) and issubclass(model, PluginDevice)):
        raise _Invalid(
            f"its config model {model!r} is not a subclass of drivers.plugins.PluginDevice"
        )
    title = model.__name__
    driver = model.model_fields["driver"].annotation
    if get_origin(driver) is not Literal or get_args(driver) != (name,):
        raise _Invalid(f'{title}.driver must be declared as Literal["{name}"]')
    if model.model_config.get("extra") != "forbid":
        raise _Invalid(f'{title} must forbid unknown keys (model_config extra="forbid")')
    tags = model.model_fields["tags"].annotation
    args = get_args(tags)
    if get_origin(tags) not in (list, collections.abc.Sequence) or len(args) != 1:
        raise _Invalid(f"{title}.tags must be a list of a PluginTag subclass")
    tag = args[0]
    if not (isinstance(tag, type) and issubclass(tag, PluginTag)):
        raise _Invalid(f"{title}.tags must be a list of a PluginTag subclass (got {tag!r})")
    if tag.model_config.get("extra") != "forbid":
        raise _Invalid(f'{tag.__name__} must forbid unknown keys (model_config extra="forbid")')
    try:
        # `retrofit-gw schema` and the editors need it; a model that has none is unusable.
        model.model_json_schema()
    except Exception as exc:
        raise _Invalid(f"{title} has no JSON Schema: {type(exc).__name__}: {exc}") from exc
