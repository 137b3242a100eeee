"""Group commit for the hot path: concurrent Redis calls share one write and one read.

Every admission and release is a Lua script or two, and Redis runs one in about 0.1 ms. Through
redis-py each call costs far more Python than that: ~50 us to pack 25 arguments, ~40 us to
parse even a two-element reply (its parser is pure Python when hiredis is absent), and a
pooled connection taken and given back around every command. On one event loop those costs
add up: at 50 concurrent admissions a decision used to wait ~14 ms, nearly all of it for
Python, and at 500 some waited more than 5 s for a pooled connection.

A :class:`Batcher` keeps one connection of its own. The commands issued during one pass of
the event loop are written together (one send); their replies are parsed as they arrive and
handed to their callers in order (Redis answers a connection's commands in the order sent).
So N concurrent decisions cost one write, a few reads and N small parses, and nothing waits
for a timer: a lone call goes out at the end of the loop pass that made it. Commands are
packed and replies parsed by hiredis' C code: done in Python, those two were a quarter of
the scheduler's CPU per admission at 50 concurrent (bench/README.md).

Redis still runs each script atomically, one after another, exactly as if the calls had come
one by one: batching changes no decision. The calls are not a transaction: an error in one
(a script error, NOSCRIPT) reaches only its caller.

Failures: a lost connection fails the calls waiting on it with ``ConnectionError`` (callers
turn it into ``RedisUnavailable``), and the next call connects again; no reply for
``socket_timeout`` while calls wait drops the connection the same way. NOSCRIPT (Redis
restarted, or SCRIPT FLUSH) loads the script and sends the call once more.

Only plain TCP and unix-socket connections are batched (the ``redis://`` and ``unix://``
URLs kernelfleet runs with); for any other kind (TLS, a credential provider) the calls go
through redis-py one by one, as before.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import hiredis
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.commands.core import AsyncScript

Arg = str | bytes | int | float
Reply = Any

#: Redis error prefixes that mean more than "this command failed" (as redis-py maps them).
_ERRORS: dict[str, type[redis_errors.RedisError]] = {
    "NOSCRIPT": redis_errors.NoScriptError,
    "LOADING": redis_errors.BusyLoadingError,
    "READONLY": redis_errors.ReadOnlyError,
    "NOAUTH": redis_errors.AuthenticationError,
    "WRONGPASS": redis_errors.AuthenticationError,
}


def pack(args: Sequence[Arg]) -> bytes:
    """One command in the Redis protocol (RESP2), packed by hiredis (C)."""
    try:
        return hiredis.pack_command(tuple(args))
    except TypeError as e:
        raise redis_errors.DataError(f"cannot send {args!r} to Redis: {e}") from e


@lru_cache(maxsize=4096)
def _packed_head(sha: str, key_count: int, shared: tuple[str, ...], total: int) -> bytes:
    """``EVALSHA sha key_count *shared`` packed, as the start of a command of ``total``
    arguments (its count first).

    Packing ~30 arguments was a tenth of the scheduler's CPU per admission; the ~20 keys of
    an owner are the same every time.
    """
    return b"*%d\r\n" % total + _arguments(pack(("EVALSHA", sha, key_count, *shared)))


def _arguments(packed: bytes) -> bytes:
    """A packed command's arguments, without the count that starts it."""
    return packed[packed.index(b"\r\n") + 2 :]


class Packed:
    """Arguments that end many calls (a user's admission arguments), packed once."""

    __slots__ = ("args", "data")

    def __init__(self, args: Sequence[Arg]) -> None:
        self.args = tuple(args)
        self.data = _arguments(pack(self.args)) if self.args else b""


def _error(message: str) -> redis_errors.RedisError:
    code = message.split(" ", 1)[0]
    return _ERRORS.get(code, redis_errors.ResponseError)(message)


class Replies:
    """Replies read from a connection's bytes as they arrive, split anywhere (hiredis' C
    parser). Errors come out as redis-py's exception types, returned, not raised."""

    def __init__(self, *, decode: bool) -> None:
        self._reader = hiredis.Reader(encoding="utf-8") if decode else hiredis.Reader()

    def feed(self, data: bytes) -> list[Reply]:
        """The replies completed by ``data`` (none while a reply is still partial);
        raises ``InvalidResponse`` on bytes that are not the Redis protocol."""
        self._reader.feed(data)
        replies = []
        try:
            while (reply := self._reader.gets()) is not False:
                if isinstance(reply, hiredis.ReplyError):
                    reply = _error(str(reply))
                replies.append(reply)
        except hiredis.ProtocolError as e:
            raise redis_errors.InvalidResponse(f"Protocol error: {e}") from e
        return replies


class _Link(asyncio.Protocol):
    """One connection: writes what a loop pass queued, hands replies to callers in order."""

    def __init__(self, *, decode: bool, timeout_s: float | None) -> None:
        self._replies = Replies(decode=decode)
        self._timeout_s = timeout_s
        self.loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._waiting: deque[asyncio.Future[Reply]] = deque()
        self._outbox: list[bytes] = []
        self._progress = 0.0  # loop time of the last reply (or of the first call waiting)
        self._watchdog: asyncio.TimerHandle | None = None
        self._failure: Exception | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def call(self, packed: bytes) -> asyncio.Future[Reply]:
        """Send ``packed`` with the rest of this loop pass's calls; its reply, later."""
        future = self.loop.create_future()
        if self.closed:
            future.set_exception(redis_errors.ConnectionError("Connection closed"))
            return future
        if not self._waiting:
            self._progress = self.loop.time()
            self._arm()
        self._waiting.append(future)
        if not self._outbox:
            self.loop.call_soon(self._flush)
        self._outbox.append(packed)
        return future

    def _flush(self) -> None:
        data, self._outbox = b"".join(self._outbox), []
        if not self.closed and self._transport is not None:
            self._transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            replies = self._replies.feed(data)
            if len(replies) > len(self._waiting):
                raise redis_errors.InvalidResponse("a reply nobody asked for")
        except redis_errors.RedisError as e:
            self.abort(redis_errors.ConnectionError(f"Protocol error: {e}"))
            return
        for reply in replies:
            future = self._waiting.popleft()
            if future.done():  # its caller was cancelled
                continue
            if isinstance(reply, redis_errors.RedisError):
                future.set_exception(reply)
            else:
                future.set_result(reply)
        self._progress = self.loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        error = self._failure or redis_errors.ConnectionError(
            f"Connection closed by server: {exc}" if exc else "Connection closed by server."
        )
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)

    def abort(self, failure: Exception) -> None:
        """Drop the connection; every waiting call fails with ``failure``."""
        self._failure = failure
        self.closed = True
        if self._transport is not None:
            self._transport.abort()  # connection_lost fails the waiting calls
        else:
            self.connection_lost(None)

    def _arm(self) -> None:
        if self._timeout_s is not None and self._watchdog is None:
            self._watchdog = self.loop.call_at(self._progress + self._timeout_s, self._check)

    def _check(self) -> None:
        """No reply for the socket timeout while calls wait: the connection is dead."""
        self._watchdog = None
        if not self._waiting or self.closed:
            return
        assert self._timeout_s is not None
        if self.loop.time() >= self._progress + self._timeout_s:
            self.abort(redis_errors.TimeoutError("Timeout reading from Redis"))
        else:
            self._arm()


_NO_TAIL = Packed(())


class Batcher:
    """Scripts and commands of concurrent callers, sent together on one connection of its own.

    Made from the scheduler's Redis client: it connects where the client's pool does, with
    the same credentials, database and timeouts; closing the client's pool (``aclose``,
    ``disconnect``) closes it too when the pool is :func:`scheduler.store.connect`'s.
    """

    def __init__(self, redis: Redis) -> None:
        pool = redis.connection_pool
        kwargs = pool.connection_kwargs
        self._redis = weakref.ref(redis)  # weak: batcher_for's registry must not keep it
        self._kwargs = kwargs
        self._unix = pool.connection_class is UnixDomainSocketConnection
        plain = pool.connection_class is Connection or self._unix
        #: False: calls go through redis-py one by one (TLS, credential providers).
        self.batched = plain and kwargs.get("credential_provider") is None
        self._link: _Link | None = None
        self._connecting: asyncio.Future[_Link] | None = None
        attach = getattr(pool, "attach", None)
        if attach is not None:
            attach(self)

    async def script(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[Arg], *,
        shared: tuple[str, ...] = (), tail: Packed = _NO_TAIL,
    ) -> Reply:  # fmt: skip
        """Run a registered script (EVALSHA); loads it first if Redis does not have it.

        ``KEYS`` is ``shared`` then ``keys``, ``ARGV`` is ``args`` then ``tail``: ``shared``
        are keys that come back call after call (a user's and a pool's), packed once and kept
        (:func:`_packed_head`); ``tail`` was packed by its maker.
        """
        if not self.batched:
            return await script(keys=[*shared, *keys],  # type: ignore[arg-type]
                                args=[*args, *tail.args])  # fmt: skip
        if shared:
            total = 3 + len(shared) + len(keys) + len(args) + len(tail.args)
            head = _packed_head(script.sha, len(shared) + len(keys), shared, total)
            packed = b"".join((head, _arguments(pack((*keys, *args))), tail.data))
        else:
            packed = pack(("EVALSHA", script.sha, len(keys), *keys, *args, *tail.args))
        link = self._link  # _call, inline: one coroutine less on every decision
        if link is None or link.closed or link.loop is not asyncio.get_running_loop():
            link = await self._connected()
        try:
            return await link.call(packed)
        except redis_errors.NoScriptError:
            source = script.script
            text = bytes(source) if isinstance(source, memoryview) else source
            await self._call(pack(("SCRIPT", "LOAD", text)))
            return await self._call(packed)

    async def command(self, *args: Arg) -> Reply:
        """One command; its reply as Redis sends it (HGETALL: a flat list)."""
        if not self.batched:
            return await self._client().execute_command(*args)
        return await self._call(pack(args))

    @staticmethod
    def _loop() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def _client(self) -> Redis:
        client = self._redis()
        if client is None:
            raise redis_errors.ConnectionError("the Redis client was closed and dropped")
        return client

    def close(self) -> None:
        """Drop the connection (calls waiting on it fail); the next call connects again."""
        link, self._link = self._link, None
        if link is not None and not link.closed and not link.loop.is_closed():
            link.abort(redis_errors.ConnectionError("Connection closed by the scheduler"))

    async def _call(self, packed: bytes) -> Reply:
        link = self._link
        if link is None or link.closed or link.loop is not self._loop():
            link = await self._connected()
        return await link.call(packed)

    async def _connected(self) -> _Link:
        """The live connection; one connect for every caller that needs it at once."""
        connecting = self._connecting
        if connecting is None or connecting.done() or connecting.get_loop() is not self._loop():
            # a new attempt: none under way, or the last one ended (failed) with nobody left
            connecting = self._connecting = asyncio.ensure_future(self._connect())
            connecting.add_done_callback(_retrieve)
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _connect(self) -> _Link:
        kw = self._kwargs
        loop = asyncio.get_running_loop()
        where = kw.get("path") if self._unix else f"{kw.get('host')}:{kw.get('port')}"
        decode = bool(kw.get("decode_responses", False))

        def made() -> _Link:
            return _Link(decode=decode, timeout_s=kw.get("socket_timeout"))

        async def opened() -> _Link:
            if self._unix:
                _, link = await loop.create_unix_connection(made, kw["path"])
            else:
                _, link = await loop.create_connection(made, kw["host"], kw["port"])
            try:
                await self._handshake(link)
            except BaseException:  # refused, or the connect timeout cancelled it
                link.abort(redis_errors.ConnectionError("handshake failed"))
                raise
            return link

        try:
            link = await asyncio.wait_for(opened(), kw.get("socket_connect_timeout"))
        except (OSError, asyncio.TimeoutError) as e:
            raise redis_errors.ConnectionError(f"Error connecting to {where}: {e}") from e
        self.close()
        self._link = link
        return link

    async def _handshake(self, link: _Link) -> None:
        kw = self._kwargs
        calls = []
        if kw.get("password"):
            user = (kw["username"],) if kw.get("username") else ()
            calls.append(link.call(pack(("AUTH", *user, kw["password"]))))
        if kw.get("db"):
            calls.append(link.call(pack(("SELECT", kw["db"]))))
        for answer in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(answer, BaseException):
                raise answer


def _retrieve(attempt: asyncio.Future[_Link]) -> None:
    """Mark a connection attempt's failure as seen (its callers may all have gone)."""
    if not attempt.cancelled():
        attempt.exception()


_BATCHERS: weakref.WeakKeyDictionary[Redis, Batcher] = weakref.WeakKeyDictionary()


def batcher_for(redis: Redis) -> Batcher:
    """The one :class:`Batcher` of ``redis`` (made on first use), shared by its users."""
    found = _BATCHERS.get(redis)
    if found is None:
        found = _BATCHERS[redis] = Batcher(redis)
    return found
