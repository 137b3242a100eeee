"""The gateway's per-message hot path: activity from headers only, fast message dates."""

from __future__ import annotations

import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest
from jupyter_client.session import Session

from gateway.server.activity_watch import execution_state_of
from gateway.server.fastdates import parse_iso8601

REPO = Path(__file__).resolve().parents[2]
GATEWAY_PYTHON = REPO / ".venv-gateway" / "bin" / "python"


def _frames(session: Session, msg_type: str, content: dict) -> list[bytes]:
    parent = session.msg("execute_request", {"code": "1+1"})["header"]
    return session.serialize(session.msg(msg_type, content, parent=parent), ident=[b"topic"])


@pytest.mark.parametrize("state", ["busy", "idle"])
def test_status_messages_give_the_execution_state(state: str) -> None:
    session = Session(key=b"secret")
    status = _frames(session, "status", {"execution_state": state})
    assert execution_state_of(status, session) == state


def test_other_messages_and_garbage_give_none() -> None:
    session = Session(key=b"secret")
    result = _frames(session, "execute_result", {"data": {"text/plain": "2"}, "metadata": {},
                                                  "execution_count": 1})  # fmt: skip
    assert execution_state_of(result, session) is None
    assert execution_state_of([b"no delimiter"], session) is None
    assert execution_state_of([b"<IDS|MSG>", b"sig", b"not json", b"{}", b"{}", b"{}"],
                              session) is None  # fmt: skip


def test_a_forged_status_does_not_change_the_state() -> None:
    """Without the kernel's key a status message must not make a busy kernel look idle."""
    forged = _frames(Session(key=b"attacker"), "status", {"execution_state": "idle"})
    assert execution_state_of(forged, Session(key=b"secret")) is None


def test_unsigned_sessions_accept_unsigned_status() -> None:
    session = Session(key=b"")
    assert execution_state_of(_frames(session, "status", {"execution_state": "idle"}),
                              session) == "idle"  # fmt: skip


@pytest.mark.parametrize(
    "text",
    ["2026-11-22T22:04:57.123456Z", "2026-11-22T22:04:57Z", "2026-11-22T22:04:57.12+01:00",
     "2026-11-22T22:04:57.123456+0100"],
)  # fmt: skip
def test_iso_dates_parse_like_dateutil(text: str) -> None:
    from dateutil.parser import parse

    assert parse_iso8601(text, fallback=parse) == parse(text)


def test_unparsable_dates_go_to_the_fallback() -> None:
    sentinel = datetime(2000, 1, 1, tzinfo=timezone.utc)
    assert parse_iso8601("yesterday", fallback=lambda text: sentinel) is sentinel


@pytest.mark.skipif(not GATEWAY_PYTHON.exists(), reason="Enterprise Gateway venv not built")
def test_install_makes_jupyter_client_6_deserialize_the_same_dates() -> None:
    code = """
from jupyter_client.jsonutil import extract_dates
from gateway.server.fastdates import install_fast_dates
header = {"date": "2026-11-22T22:04:57.123456Z", "msg_id": "x"}
before = extract_dates(header)
assert install_fast_dates() and install_fast_dates()
assert extract_dates(header) == before, (extract_dates(header), before)
print("ok")
"""
    out = subprocess.run([str(GATEWAY_PYTHON), "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.stdout.strip() == "ok", out.stderr
