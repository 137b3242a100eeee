"""The warm claim's personalisation: the code it runs in the kernel, and how its reply is read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from gateway.server.warm import CHECKS, personalise_code, personalised


def test_values_cannot_change_the_code_around_them(tmp_path: Path) -> None:
    hostile = {
        "KERNEL_USERNAME": "alice",
        "KERNEL_NOTE": "x'); import os; os.environ['PWNED'] = '1'; ('",
        "KERNEL_LINES": 'two\nlines "and" quotes \\ backslash',
    }
    code = personalise_code(hostile, str(tmp_path))
    report = "import json, os; print(json.dumps({k: os.environ.get(k) for k in %r}))" % (
        [*hostile, "PWNED", "KERNEL_WARM"]
    )
    result = subprocess.run(
        [sys.executable, "-c", code + report], capture_output=True, text=True, check=True,
        env={"KERNEL_WARM": "true", "PATH": "/usr/bin:/bin"}, cwd="/",
    )  # fmt: skip
    seen = json.loads(result.stdout)
    assert {k: seen[k] for k in hostile} == hostile  # every value arrives exactly
    assert seen["PWNED"] is None and seen["KERNEL_WARM"] is None  # no injection; not warm


def reply(status: str = "ok", **values: str) -> dict:
    found = {name: {"status": "ok", "data": {"text/plain": text}} for name, text in values.items()}
    return {"content": {"status": status, "user_expressions": found}}


def test_only_a_reply_showing_the_users_name_home_and_cwd_counts() -> None:
    home = "/homes/alice"
    good = {"user": "'alice'", "home": repr(home), "cwd": repr(home), "warm": "None"}
    assert set(good) == set(CHECKS)
    assert personalised(reply(**good), user="alice", home=home) is None
    assert "cwd" in personalised(reply(**{**good, "cwd": "'/'"}), user="alice", home=home)
    assert "user" in personalised(reply(**{**good, "user": "'bob'"}), user="alice", home=home)
    assert "warm" in personalised(reply(**{**good, "warm": "'true'"}), user="alice", home=home)
    failed = {"content": {"status": "error", "ename": "OSError", "evalue": "no such dir"}}
    assert "OSError" in personalised(failed, user="alice", home=home)
