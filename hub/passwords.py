"""Per-user password hashes for the embedded authenticator (``<state_dir>/passwords.json``).

The file maps each user to ``pbkdf2_sha256$<iterations>$<salt hex>$<hash hex>``
(see docs/contracts.md). ``kernelfleet up`` writes it with :func:`write_password_file`;
the hub's :class:`hub.authenticator.KernelfleetAuthenticator` checks logins with
:func:`verify_password`. Plain passwords are never stored.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
from collections.abc import Mapping
from pathlib import Path

from kernelfleet.errors import KernelfleetError

SCHEME = "pbkdf2_sha256"
#: OWASP's 2023 recommendation for PBKDF2-HMAC-SHA256; about 0.3 s per check on one core.
DEFAULT_ITERATIONS = 600_000
# A corrupted or hostile file must not make one login burn minutes of CPU.
_MAX_ITERATIONS = 10_000_000
_SALT_BYTES = 16


class PasswordFileError(KernelfleetError):
    """passwords.json is missing or malformed; the message names the file and the fix."""


def _derive(plain: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", plain.encode("utf-8"), salt, iterations)


def hash_password(plain: str, *, iterations: int = DEFAULT_ITERATIONS) -> str:
    """Return ``pbkdf2_sha256$<iterations>$<salt hex>$<hash hex>`` for ``plain``, fresh salt."""
    if not 1 <= iterations <= _MAX_ITERATIONS:
        raise ValueError(f"iterations must be 1..{_MAX_ITERATIONS}, got {iterations}")
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = _derive(plain, salt, iterations)
    return f"{SCHEME}${iterations}${salt.hex()}${digest.hex()}"


def verify_password(plain: str, stored: str) -> bool:
    """True if ``plain`` matches the ``stored`` hash; False for a mismatch or a malformed hash.

    The comparison is constant-time (:func:`hmac.compare_digest`).
    """
    try:
        scheme, iterations_text, salt_hex, digest_hex = stored.split("$")
        iterations = int(iterations_text)
        salt, expected = bytes.fromhex(salt_hex), bytes.fromhex(digest_hex)
    except (AttributeError, ValueError):
        return False
    if scheme != SCHEME or not 1 <= iterations <= _MAX_ITERATIONS or not expected:
        return False
    return hmac.compare_digest(_derive(plain, salt, iterations), expected)


def write_password_file(
    path: str | os.PathLike[str],
    passwords: Mapping[str, str],
    *,
    iterations: int = DEFAULT_ITERATIONS,
) -> None:
    """Hash each ``{user: plain password}`` and write them to ``path`` (mode 0600).

    The file is replaced atomically, so a hub reading it mid-write sees the old or the new
    version, never half of one. Missing parent folders are created.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    hashes = {
        user: hash_password(plain, iterations=iterations) for user, plain in passwords.items()
    }
    # mkstemp creates the file with mode 0600, before any secret is written to it.
    fd, tmp_name = tempfile.mkstemp(prefix=".passwords-", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as tmp:
            json.dump(hashes, tmp, indent=2, sort_keys=True)
            tmp.write("\n")
        os.chmod(tmp_name, 0o600)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def read_password_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Return ``{user: stored hash}`` from ``path``; raise PasswordFileError if unusable."""
    source = Path(path)
    try:
        data = json.loads(source.read_text())
    except FileNotFoundError:
        raise PasswordFileError(
            f"{source}: file not found; `kernelfleet up` creates it on its first run"
        ) from None
    except (OSError, ValueError) as e:
        raise PasswordFileError(f"{source}: not readable JSON: {e}") from e
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise PasswordFileError(f"{source}: must be a JSON object of user name -> hash string")
    return data
