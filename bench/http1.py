"""A minimal keep-alive HTTP/1.1 client for load generation on this machine.

httpx spent ~13 ms of CPU per request in the bench process at 50 concurrent connections
(its pool scheduling), more than the scheduler it was measuring, so the admission phase's
HTTP figures would have measured the client. This client does the least an HTTP/1.1 client
can: one request at a time per connection, ``Content-Length`` bodies only (what uvicorn
sends for JSON), connections kept in a LIFO pool.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit


class Http1Connection:
    """One keep-alive connection to ``host:port``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 host: str) -> None:  # fmt: skip
        self._reader, self._writer, self._host = reader, writer, host

    @classmethod
    async def open(cls, host: str, port: int) -> Http1Connection:
        """Connect (asyncio sets TCP_NODELAY on the socket)."""
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, f"{host}:{port}")

    async def request(self, method: str, path: str, *, body: Any = None,
                      headers: Mapping[str, str] = {}) -> tuple[int, bytes]:  # fmt: skip
        """Send one request (``body`` as JSON when given); the status and response body."""
        payload = b"" if body is None else json.dumps(body).encode()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self._host}",
                 f"Content-Length: {len(payload)}"]  # fmt: skip
        if body is not None:
            lines.append("Content-Type: application/json")
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        status_line = await self._reader.readuntil(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        length = 0
        while (line := await self._reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        return status, await self._reader.readexactly(length)

    async def close(self) -> None:
        """Close the connection."""
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError:
            pass


class Http1Pool:
    """Up to ``size`` connections to ``url``, each used by one request at a time."""

    def __init__(self, url: str, size: int, *, headers: Mapping[str, str] = {}) -> None:
        parts = urlsplit(url)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        self._headers = dict(headers)
        self._idle: list[Http1Connection] = []
        self._slots = asyncio.Semaphore(size)
        self._all: list[Http1Connection] = []

    async def request(self, method: str, path: str, *, body: Any = None) -> tuple[int, Any]:
        """One request on an idle connection (opened if none); status and JSON body."""
        async with self._slots:
            if self._idle:
                connection = self._idle.pop()
            else:
                connection = await Http1Connection.open(self._host, self._port)
                self._all.append(connection)
            status, raw = await connection.request(method, path, body=body,
                                                   headers=self._headers)  # fmt: skip
            self._idle.append(connection)
        return status, json.loads(raw) if raw else None

    async def aclose(self) -> None:
        """Close every connection."""
        for connection in self._all:
            await connection.close()
