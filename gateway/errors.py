"""Every exception the gateway raises on purpose, in one tree.

    GatewayError
    ├── ConfigError              a config file is invalid; carries every issue found
    ├── OutboxError              the outbox file cannot be opened or used; left untouched
    └── DeviceError              a device or its link misbehaved; retried by the runner
        ├── DeviceTimeout        no answer within the timeout
        ├── ConnectionLost       could not connect, or the link broke
        ├── DeviceException      the device answered with a protocol exception
        └── DecodeError          the answer does not decode as configured

Anything else escaping a driver is a programming error and ends the process loudly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "BadFrame",
    "ConfigError",
    "ConfigIssue",
    "ConnectionLost",
    "DecodeError",
    "DeviceError",
    "DeviceException",
    "DeviceTimeout",
    "GatewayError",
    "OutboxError",
    "WriteRefused",
]


class GatewayError(Exception):
    """Base of every error the gateway raises deliberately."""


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in one config file, located as precisely as we can."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        key = f" {self.key}:" if self.key else ""
        return f"{where}:{key} {self.message}"


@dataclass
class ConfigError(GatewayError):
    """A config failed validation. ``issues`` holds every problem found, in file order."""

    issues: list[ConfigIssue] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(str(i) for i in self.issues)


class DeviceError(GatewayError):
    """A device or its link misbehaved. The runner counts it by ``kind`` and retries."""

    kind = "error"


class DeviceTimeout(DeviceError):
    kind = "timeout"


class BadFrame(DeviceTimeout):
    """Bytes arrived but formed no valid reply before the timeout: a CRC or LRC error, noise,
    or two slaves talking at once. On a serial line it points at wiring (termination,
    biasing, a shared unit id) rather than at a device that is off."""

    kind = "bad_frame"


class ConnectionLost(DeviceError):
    kind = "connection"


class DeviceException(DeviceError):
    """The device answered with a protocol exception response.

    For Modbus, ``code`` is the exception code (2 = ILLEGAL DATA ADDRESS, 6 = BUSY, ...).
    """

    kind = "exception"

    def __init__(self, code: int, name: str, *, request: str = "") -> None:
        self.code = code
        self.name = name
        self.request = request
        suffix = f" for {request}" if request else ""
        super().__init__(f"{name} ({code}){suffix}")


class DecodeError(DeviceError):
    kind = "decode"


class WriteRefused(GatewayError):
    """A write to a machine was refused before anything was sent, or failed on the way.

    ``code`` is machine-readable (the MQTT reply and the audit carry it): ``unknown_tag``,
    ``not_writable``, ``bad_type``, ``out_of_range``, ``not_allowed``, ``rate_limited``,
    ``not_representable``, ``forbidden``, ``device`` (the device refused or did not answer)
    or ``verify_failed`` (written, but the read-back differs).
    """

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class OutboxError(GatewayError):
    """The outbox file cannot be used (locked, not an outbox, a newer schema); left as it is."""
