"""hub.passwords: hashing, verification and the passwords.json file."""

from __future__ import annotations

import json
import stat

import pytest

from hub.passwords import (
    PasswordFileError,
    hash_password,
    read_password_file,
    verify_password,
    write_password_file,
)

FAST = 1_000  # iterations: enough to exercise the code, cheap enough for unit tests


def test_hash_has_the_contract_format() -> None:
    stored = hash_password("s3cret", iterations=FAST)
    scheme, iterations, salt, digest = stored.split("$")
    assert (scheme, iterations) == ("pbkdf2_sha256", str(FAST))
    assert len(bytes.fromhex(salt)) == 16
    assert len(bytes.fromhex(digest)) == 32


def test_default_iterations_are_strong() -> None:
    assert int(hash_password("x").split("$")[1]) >= 600_000


def test_same_password_gets_a_fresh_salt() -> None:
    assert hash_password("same", iterations=FAST) != hash_password("same", iterations=FAST)


def test_verify_accepts_the_right_password_only() -> None:
    stored = hash_password("correct horse", iterations=FAST)
    assert verify_password("correct horse", stored)
    assert not verify_password("correct horse ", stored)
    assert not verify_password("", stored)


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "plain-text-password",
        "md5$1000$00$00",
        "pbkdf2_sha256$abc$00$00",
        "pbkdf2_sha256$0$00$00",
        "pbkdf2_sha256$99999999999$00$00",
        "pbkdf2_sha256$1000$zz$00",
        "pbkdf2_sha256$1000$00$",
        "pbkdf2_sha256$1000$00$00$extra",
    ],
)
def test_verify_rejects_malformed_hashes(stored: str) -> None:
    assert verify_password("anything", stored) is False


def test_hash_refuses_silly_iterations() -> None:
    with pytest.raises(ValueError, match="iterations"):
        hash_password("x", iterations=0)


def test_write_password_file_is_private_and_verifiable(tmp_path) -> None:
    path = tmp_path / "state" / "passwords.json"
    write_password_file(path, {"alice": "a-pw", "bob": "b-pw"}, iterations=FAST)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = json.loads(path.read_text())
    assert sorted(stored) == ["alice", "bob"]
    assert "a-pw" not in path.read_text()
    assert verify_password("a-pw", stored["alice"])
    assert not verify_password("a-pw", stored["bob"])
    assert list(tmp_path.joinpath("state").iterdir()) == [path]  # no temp file left


def test_write_password_file_replaces_the_old_file(tmp_path) -> None:
    path = tmp_path / "passwords.json"
    write_password_file(path, {"alice": "old"}, iterations=FAST)
    write_password_file(path, {"alice": "new"}, iterations=FAST)
    assert verify_password("new", read_password_file(path)["alice"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_read_password_file_missing(tmp_path) -> None:
    with pytest.raises(PasswordFileError, match="kernelfleet up"):
        read_password_file(tmp_path / "passwords.json")


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"alice": 3}'])
def test_read_password_file_malformed(tmp_path, content: str) -> None:
    path = tmp_path / "passwords.json"
    path.write_text(content)
    with pytest.raises(PasswordFileError, match=str(path)):
        read_password_file(path)
