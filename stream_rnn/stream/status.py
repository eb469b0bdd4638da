"""A worker's status endpoint: ``GET /`` answers one JSON object (partitions, counts, model).

faust-streaming 0.15 starts no HTTP server of its own unless one is registered with
``app.web_server``; this is the one a worker registers when given ``--web-port``. It binds
127.0.0.1 only, answers every request with the same JSON and closes the connection, so it
needs no web framework. Each worker of a group gets its own port.

Example::

    app.web_server(StatusServer(lambda: {"assigned": [0, 2]}, port=6070))
    # curl -s 127.0.0.1:6070/   ->   {"assigned":[0,2]}
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import msgspec
from mode import Service

from stream_rnn.stream.exceptions import StreamError

log = logging.getLogger("stream_rnn.worker")
READ_TIMEOUT_S = 2.0


class StatusServer(Service):
    """Serves ``status()`` as JSON on ``host:port`` while the faust app runs."""

    def __init__(
        self,
        status: Callable[[], dict[str, Any]],
        *,
        port: int,
        host: str = "127.0.0.1",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.status = status
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def on_start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._answer, self.host, self.port)
        except OSError as err:
            raise StreamError(
                f"cannot serve the worker status on {self.host}:{self.port} ({err}); give each "
                "worker its own --web-port, or leave it out"
            ) from err
        log.info("status endpoint on http://%s:%d/", self.host, self.port)

    async def on_stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            # Read the request head (bounded in size and time); its content does not matter.
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):
            pass
        body = msgspec.json.encode(self.status())
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        try:
            writer.write(head.encode() + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
