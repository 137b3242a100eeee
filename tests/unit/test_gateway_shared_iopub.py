"""The kernel's one iopub subscription in the gateway, shared by its activity watch and its
connections (gateway.server.iopub), on real ZMQ sockets.

Each case runs in the gateway virtualenv (EG's pyzmq 24 and the gateway's ChannelStream): a
PUB socket plays the kernel, the shared subscription is a ChannelStream, and the views are
what each channels connection gets as its iopub stream.
"""

from __future__ import annotations

from tests.support.gateway_venv import needs_gateway_venv, run_in_gateway

pytestmark = needs_gateway_venv

PRELUDE = """
import json, time, zmq
from tornado.ioloop import IOLoop
from gateway.server.zmqstreams import ChannelStream
from gateway.server import iopub

ctx = zmq.Context()
loop = IOLoop.current()
result = {}

def kernel_iopub():
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{port}")
    for _ in range(200):  # until the subscription is live (ZMQ's slow joiner)
        pub.send_multipart([b"hello"])
        if sub.poll(10):
            while sub.poll(50):
                sub.recv_multipart()
            break
    return pub, ChannelStream(sub, loop)

watched = []
shared = iopub.SharedIOPub()
pub, stream = kernel_iopub()
shared.attach(stream, lambda msg: watched.append(msg[0].decode()))

def publish(*names):
    for name in names:
        pub.send_multipart([name.encode()])

def later(seconds, fn):
    loop.call_later(seconds, fn)

def run(seconds):
    loop.call_later(seconds, loop.stop)
    loop.start()
"""


def run_case(body: str) -> dict:
    """Run PRELUDE + body in the gateway venv; the dict it left in ``result``."""
    return run_in_gateway(PRELUDE, body)


def test_every_message_reaches_the_watch_first_then_each_connection_in_order() -> None:
    result = run_case("""
got = {"a": [], "b": [], "order": []}
a, b = shared.view(), shared.view()
b.channel = "iopub"
a.on_recv(lambda msg: (got["a"].append(msg[0].decode()), got["order"].append(("a", len(watched)))))
b.on_recv_stream(lambda s, msg: got["b"].append([s.channel, msg[0].decode()]))
later(0.05, lambda: publish("m1", "m2", "m3"))
later(0.3, lambda: a.close())
later(0.4, lambda: publish("m4"))
run(0.8)
result.update(got, watched=watched, a_closed=a.closed(), b_closed=b.closed(),
              a_socket_closed=a.socket.closed, b_socket_closed=b.socket.closed)
""")
    assert result["watched"] == ["m1", "m2", "m3", "m4"]
    assert result["a"] == ["m1", "m2", "m3"]  # nothing after it closed
    assert result["b"] == [["iopub", "m1"], ["iopub", "m2"], ["iopub", "m3"], ["iopub", "m4"]]
    # the watch had seen each message before the connection got it
    assert result["order"] == [["a", 1], ["a", 2], ["a", 3]]
    # jupyter_server's stop_buffering asks a stream's socket whether it is closed
    assert result["a_closed"] and result["a_socket_closed"]
    assert not result["b_closed"] and not result["b_socket_closed"]


def test_messages_wait_for_a_callback_and_come_in_order_before_later_ones() -> None:
    """As in a socket of its own: what arrives before ``on_recv`` (or during
    ``stop_on_recv``) is handed over once a callback is set, on a later loop pass."""
    result = run_case("""
got, during_on_recv = [], []
view = shared.view()
def take(msg):
    got.append(msg[0].decode())
    if msg[0] == b"w2":
        view.stop_on_recv()  # e.g. a nudge that has what it waited for
def subscribe():
    view.on_recv(take)
    during_on_recv.extend(got)  # nothing handed over inside on_recv itself
    publish("n1")
later(0.05, lambda: publish("w1", "w2", "w3"))
later(0.2, subscribe)
later(0.4, lambda: (result.update(stopped_after=list(got)), view.on_recv(take)))
later(0.5, lambda: publish("n2"))
run(0.8)
result.update(got=got, during_on_recv=during_on_recv)
""")
    assert result["during_on_recv"] == []
    assert result["stopped_after"] == ["w1", "w2"]
    assert result["got"] == ["w1", "w2", "w3", "n1", "n2"]


def test_a_connection_without_a_callback_keeps_at_most_the_limit() -> None:
    result = run_case("""
iopub.WAITING_LIMIT = 5
got = []
view = shared.view()
later(0.05, lambda: publish(*[f"m{i}" for i in range(8)]))
later(0.3, lambda: view.on_recv(lambda msg: got.append(msg[0].decode())))
run(0.6)
result.update(got=got, watched=len(watched))
""")
    assert result["watched"] == 8
    assert result["got"] == ["m0", "m1", "m2", "m3", "m4"]  # like ZMQ: new ones are dropped


def test_one_connections_failing_callback_does_not_starve_the_others() -> None:
    result = run_case("""
got = []
bad, good = shared.view(), shared.view()
def fail(msg):
    raise RuntimeError("broken client")
bad.on_recv(fail)
good.on_recv(lambda msg: got.append(msg[0].decode()))
later(0.05, lambda: publish("m1", "m2"))
run(0.4)
result.update(got=got, watched=watched)
""")
    assert result == {"got": ["m1", "m2"], "watched": ["m1", "m2"]}


def test_connections_follow_the_watch_when_it_is_restarted_on_new_ports() -> None:
    """A remote kernel restarted on new ports: EG closes the watch and starts a new one."""
    result = run_case("""
got = []
view = shared.view()
view.on_recv(lambda msg: got.append(msg[0].decode()))
states = {}
def restart():
    global pub
    stream.close()
    states["while_stopped"] = view.closed()
    pub, new_stream = kernel_iopub()
    shared.attach(new_stream, lambda msg: watched.append(msg[0].decode()))
    states["after"] = view.closed()
    publish("new")
later(0.05, lambda: publish("old"))
later(0.2, restart)
run(0.6)
result.update(got=got, **states)
""")
    assert result["while_stopped"] is True and result["after"] is False
    assert result["got"] == ["old", "new"]


def test_flush_hands_over_what_arrived_before_returning() -> None:
    """jupyter_server flushes iopub before it sends a restarting or dead status, so that the
    kernel's last output reaches the client first."""
    result = run_case("""
got = []
view = shared.view()
view.on_recv(lambda msg: got.append(msg[0].decode()))
def flush_now():
    publish("last1", "last2")
    time.sleep(0.1)  # arrived in the socket; the loop has not run yet
    view.flush()
    result["at_flush"] = list(got)
later(0.05, flush_now)
run(0.4)
""")
    assert result["at_flush"] == ["last1", "last2"]
