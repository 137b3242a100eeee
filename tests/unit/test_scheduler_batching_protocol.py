"""The Redis protocol as scheduler.batching writes and reads it: replies split anywhere,
nested arrays, nil, numbers, and errors mapped to redis-py's exception types."""

from __future__ import annotations

import pytest
from redis import exceptions as redis_errors

from scheduler.batching import Replies, pack


def _encode(value: object) -> bytes:
    if isinstance(value, list):
        return b"*%d\r\n" % len(value) + b"".join(_encode(v) for v in value)
    if isinstance(value, int):
        return b":%d\r\n" % value
    if value is None:
        return b"$-1\r\n"
    data = str(value).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


REPLIES = [["admitted", ""], ["queued", 3], None, ["a\r\nb", ["é", [None, -1]]], "x" * 300]


def test_replies_come_whole_and_never_early() -> None:
    buf = b"".join(_encode(r) for r in REPLIES) + b"+OK\r\n"
    assert Replies(decode=True).feed(buf) == [*REPLIES, "OK"]
    for cut in range(1, len(buf)):  # split anywhere: the same replies, none early
        replies = Replies(decode=True)
        first = replies.feed(buf[:cut])
        assert first == [*REPLIES, "OK"][: len(first)]
        assert first + replies.feed(buf[cut:]) == [*REPLIES, "OK"]


def test_bytes_stay_bytes_without_decoding() -> None:
    assert Replies(decode=False).feed(_encode(["a", 1])) == [[b"a", 1]]


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (b"-NOSCRIPT No matching script\r\n", redis_errors.NoScriptError),
        (b"-LOADING Redis is loading the dataset\r\n", redis_errors.BusyLoadingError),
        (b"-WRONGTYPE Operation against a key\r\n", redis_errors.ResponseError),
        (b"-ERR user_script:1: boom\r\n", redis_errors.ResponseError),
    ],
)
def test_errors_are_returned_as_redis_py_exceptions(line: bytes, kind: type) -> None:
    [error] = Replies(decode=True).feed(line)
    assert type(error) is kind and str(error) == line[1:-2].decode()


def test_bytes_that_are_not_the_protocol_are_an_invalid_response() -> None:
    with pytest.raises(redis_errors.InvalidResponse):
        Replies(decode=True).feed(b"?what\r\n")


def test_loading_counts_as_redis_unreachable() -> None:
    # callers turn ConnectionError into 503 redis_unavailable, as with redis-py
    assert issubclass(redis_errors.BusyLoadingError, redis_errors.ConnectionError)


def test_pack_writes_what_redis_reads() -> None:
    assert pack(("EVALSHA", "ab", 2, b"k\r\n", 1.5)) == (
        b"*5\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n2\r\n$3\r\nk\r\n\r\n$3\r\n1.5\r\n"
    )
    assert pack(("SET", "é")) == b"*2\r\n$3\r\nSET\r\n$2\r\n\xc3\xa9\r\n"
    with pytest.raises(redis_errors.DataError):
        pack(("SET", None))  # type: ignore[arg-type]
