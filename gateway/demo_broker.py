"""An embedded MQTT broker for ``retrofit-gw demo`` only. The only importer of amqtt.

Evaluation aid, not a production broker: real sites run mosquitto (see the README). It binds
loopback, allows anonymous clients and keeps nothing on disk.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any, Self

from gateway.errors import GatewayError

__all__ = ["DemoBroker"]

log = logging.getLogger("gateway.demo_broker")


class DemoBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port
        self._broker: Any = None

    async def start(self) -> None:
        try:
            from amqtt.broker import Broker  # noqa: PLC0415 - optional [demo] dependency
        except ImportError as exc:
            raise GatewayError(
                "the demo's embedded broker needs the [demo] extra: pip install "
                "'retrofit-gateway[demo]', or point the demo at a broker with --broker HOST:PORT"
            ) from exc
        # amqtt logs every packet at INFO through its default plugins; keep only what matters.
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }
        broker = Broker(config)
        try:
            await broker.start()
        except Exception as exc:
            raise GatewayError(
                f"demo broker: cannot listen on {self.host}:{self.port} ({exc}); is another "
                f"broker running there? Then use --broker {self.host}:{self.port}"
            ) from exc
        self._broker = broker
        log.info("embedded demo MQTT broker on %s:%d (evaluation only)", self.host, self.port)

    async def close(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
