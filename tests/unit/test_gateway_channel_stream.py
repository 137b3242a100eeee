"""The gateway's kernel channel streams (gateway.server.zmqstreams) on real ZMQ sockets.

They run inside Enterprise Gateway, on its pyzmq (< 25), so each case runs in the gateway
virtualenv: a tornado loop, a ChannelStream, and a plain pyzmq socket as the kernel's side.
"""

from __future__ import annotations

from tests.support.gateway_venv import needs_gateway_venv, run_in_gateway

pytestmark = needs_gateway_venv

PRELUDE = """
import json, zmq
from tornado.ioloop import IOLoop
from gateway.server.zmqstreams import ChannelStream, DRAIN_LIMIT

ctx = zmq.Context()
loop = IOLoop.current()
result = {}

def pair(kind, peer_kind):
    peer = ctx.socket(peer_kind)
    port = peer.bind_to_random_port("tcp://127.0.0.1")
    sock = ctx.socket(kind)
    sock.linger = 0
    sock.connect(f"tcp://127.0.0.1:{port}")
    return ChannelStream(sock, loop), peer, port

def run(seconds=10):
    loop.call_later(seconds, loop.stop)
    loop.start()
"""


def run_case(body: str) -> dict:
    """Run PRELUDE + body in the gateway venv; the dict it left in ``result``."""
    return run_in_gateway(PRELUDE, body)


def test_requests_and_replies_interleaved_all_arrive_in_order() -> None:
    """A kernel answering each request at once, while the client keeps sending.

    ZMQ's file descriptor wakes the loop once per change: a send can take the wake-up of a
    reply that arrived meanwhile. Here requests go out from loop callbacks of their own
    (as a browser's messages do), a few at a time, while replies arrive; a reply left
    waiting for a wake-up that never comes stalls the run and it ends short.
    """
    result = run_case("""
import threading, time, zmq
stream, kernel, _ = pair(zmq.DEALER, zmq.ROUTER)
def echo():
    while True:
        try:
            ident, *parts = kernel.recv_multipart()
        except zmq.ContextTerminated:
            return
        kernel.send_multipart([ident, *parts])
threading.Thread(target=echo, daemon=True).start()
got, sent = [], [0]
COUNT = 150
def on_reply(msg):
    got.append(int(msg[0]))
    if len(got) == COUNT:
        loop.stop()
def send_some():
    time.sleep(0.004)  # a reply arrives meanwhile; libzmq reads its mailbox on a send again
    for _ in range(3):
        if sent[0] < COUNT:
            stream.send_multipart([str(sent[0]).encode(), b"x" * 100])
            sent[0] += 1
    if sent[0] < COUNT:
        loop.call_later(0.0005, send_some)
stream.on_recv(on_reply)
loop.add_callback(send_some)
run()
result["got"] = got
""")
    assert result["got"] == list(range(150))


def test_messages_waiting_before_the_loop_runs_are_all_handed_over_in_order() -> None:
    result = run_case("""
import time
stream, kernel, port = pair(zmq.SUB, zmq.PUB)
stream.socket.setsockopt(zmq.SUBSCRIBE, b"")
time.sleep(0.3)  # let the subscription reach the publisher
count = 3 * DRAIN_LIMIT + 5
for i in range(count):
    kernel.send_multipart([b"iopub", str(i).encode()])
time.sleep(0.3)  # all of them now wait in the stream's socket
got = []
def on_msg(msg):
    got.append(int(msg[1]))
    if len(got) == count:
        loop.stop()
stream.on_recv(on_msg)
run()
result["got"], result["count"] = got, count
""")
    assert result["got"] == list(range(result["count"]))


def test_sends_the_socket_cannot_take_yet_are_queued_and_keep_their_order() -> None:
    """No kernel connected yet: the first sends wait; a later one must not overtake them."""
    result = run_case("""
import socket as pysocket, time
probe = pysocket.socket(); probe.bind(("127.0.0.1", 0)); port = probe.getsockname()[1]
probe.close()
sock = ctx.socket(zmq.DEALER); sock.linger = 0
sock.setsockopt(zmq.IMMEDIATE, 1)  # no pipe until connected: a send now gets EAGAIN
sock.connect(f"tcp://127.0.0.1:{port}")
stream = ChannelStream(sock, loop)
for i in range(3):
    stream.send_multipart([str(i).encode()])
result["queued"] = stream.sending()
kernel = ctx.socket(zmq.ROUTER)
kernel.bind(f"tcp://127.0.0.1:{port}")
time.sleep(0.3)  # connected now, before the loop has sent what waits in the queue
stream.send_multipart([b"3"])
got = []
def poll():
    while kernel.poll(0):
        got.append(int(kernel.recv_multipart()[1]))
    if len(got) < 4:
        loop.call_later(0.01, poll)
    else:
        loop.stop()
loop.call_later(0.01, poll)
run()
result["got"] = got
""")
    assert result["queued"] is True
    assert result["got"] == [0, 1, 2, 3]


def test_a_callback_may_stop_receiving_or_close_the_stream_mid_batch() -> None:
    result = run_case("""
import time
stream, kernel, _ = pair(zmq.SUB, zmq.PUB)
stream.socket.setsockopt(zmq.SUBSCRIBE, b"")
time.sleep(0.3)
for i in range(10):
    kernel.send_multipart([b"iopub", str(i).encode()])
time.sleep(0.3)
first, second = [], []
def stop_after_three(msg):
    first.append(int(msg[1]))
    if len(first) == 3:
        stream.stop_on_recv()
        loop.call_later(0.2, resume)
def resume():
    result["paused_at"] = list(first)
    stream.on_recv(close_after_two)
def close_after_two(msg):
    second.append(int(msg[1]))
    if len(second) == 2:
        stream.close()
        loop.call_later(0.2, loop.stop)
stream.on_recv(stop_after_three)
run()
result["first"], result["second"], result["closed"] = first, second, stream.closed()
""")
    assert result["paused_at"] == [0, 1, 2]
    assert result["second"] == [3, 4]
    assert result["closed"] is True


def test_a_send_with_a_callback_still_reports_it() -> None:
    result = run_case("""
stream, kernel, _ = pair(zmq.DEALER, zmq.ROUTER)
sent = []
def on_sent(msg, status):
    sent.append([part.decode() for part in msg])
    loop.stop()
stream.send_multipart([b"hello"], callback=on_sent)
run()
result["sent"] = sent
result["kernel_got"] = kernel.recv_multipart()[1].decode()
""")
    assert result["sent"] == [["hello"]]
    assert result["kernel_got"] == "hello"
