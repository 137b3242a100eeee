"""Kernelspec secrets: templating by verified user and group, the file provider, redaction."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.server.compliance import Compliance
from gateway.server.compliance_config import ComplianceConfigError, ComplianceSettings
from gateway.server.errors import GatewayError
from gateway.server.identity import Identity
from gateway.server.redaction import RedactingFilter, Redactor, SecretValues
from gateway.server.secrets import (
    ResolvedSecrets,
    SecretForbidden,
    SecretNotFound,
    SecretResolver,
    candidate_paths,
)
from gateway.server.secrets_file import FileSecretsProvider
from kernelfleet.kernelspecs.spec import AuditPolicy, KernelSpec, SecretRef

ANALYSTS_PW, ML_PW, ALICE_TOKEN = "analysts-pw-9f2c", "ml-pw-77aa", "alice-token-31e0"
STORE: dict[str, dict[str, Any]] = {
    "kv/data/teams/analysts/warehouse": {"password": ANALYSTS_PW, "username": "analyst"},
    "kv/data/teams/ml/warehouse": {"password": ML_PW, "username": "ml"},
    "kv/data/users/alice/api": {"token": ALICE_TOKEN, "port": 5432, "nested": {"a": 1}},
}
ALICE = Identity("alice", frozenset({"analysts"}))
BOB = Identity("bob", frozenset({"ml", "zeta"}))
NOBODY = Identity("nobody", frozenset())


class DictProvider:
    """A provider over a dict; ``forbidden`` paths answer permission denied."""

    label = "the test store"

    def __init__(self, store: Mapping[str, Mapping[str, Any]], forbidden: tuple[str, ...] = ()):
        self.store, self.forbidden = store, forbidden
        self.reads: list[str] = []

    async def read(self, path: str) -> Mapping[str, Any]:
        self.reads.append(path)
        if path in self.forbidden:
            raise SecretForbidden("permission denied by the test store")
        if path not in self.store:
            raise SecretNotFound("not found in the test store")
        return self.store[path]

    async def aclose(self) -> None:
        return None


def _spec(*secrets: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"kernelfleet": {"name": "warehouse", "pool": "cpu", "groups": ["*"],
                                         "secrets": list(secrets)}}}  # fmt: skip


WAREHOUSE = {"path": "kv/data/teams/{group}/warehouse", "env": {"WAREHOUSE_PASSWORD": "password"}}


def test_paths_come_from_the_verified_user_and_their_own_groups() -> None:
    assert candidate_paths("kv/data/users/{user}/api", ALICE) == ["kv/data/users/alice/api"]
    assert candidate_paths("kv/data/teams/{group}/w", BOB) == [
        "kv/data/teams/ml/w", "kv/data/teams/zeta/w"
    ]  # fmt: skip
    with pytest.raises(SecretForbidden, match="you are in no group"):
        candidate_paths("kv/data/teams/{group}/w", NOBODY)
    for evil in (Identity("../admin"), Identity("a/b"), Identity("x", frozenset({"../ml"}))):
        with pytest.raises(SecretForbidden, match="cannot be used in a secret path"):
            candidate_paths("kv/data/{user}/{group}/w", evil)
    with pytest.raises(ValueError, match="only {user} and {group}"):
        candidate_paths("kv/{user.__class__}", ALICE)


async def test_each_user_gets_their_own_groups_secret_and_never_another_groups() -> None:
    resolver = SecretResolver(DictProvider(STORE))
    alice = await resolver.resolve(ALICE, "warehouse", _spec(WAREHOUSE))
    bob = await resolver.resolve(BOB, "warehouse", _spec(WAREHOUSE))
    assert alice.env == {"WAREHOUSE_PASSWORD": ANALYSTS_PW}
    assert bob.env == {"WAREHOUSE_PASSWORD": ML_PW}
    assert alice.sources == {"WAREHOUSE_PASSWORD": "kv/data/teams/analysts/warehouse"}
    outsider = Identity("eve", frozenset({"finance"}))
    with pytest.raises(GatewayError) as refused:
        await resolver.resolve(outsider, "warehouse", _spec(WAREHOUSE))
    assert refused.value.status_code == 403 and refused.value.code == "secret_not_found"
    assert refused.value.message == (
        "Kernel 'warehouse' cannot start: secret for WAREHOUSE_PASSWORD: "
        "kv/data/teams/finance/warehouse: not found in the test store."
    )


async def test_user_secrets_several_keys_and_optional_ones() -> None:
    resolver = SecretResolver(DictProvider(STORE))
    spec = _spec(
        {"path": "kv/data/users/{user}/api", "env": {"API_TOKEN": "token", "API_PORT": "port"}},
        {"path": "kv/data/users/{user}/extra", "env": {"EXTRA": "x"}, "optional": True},
    )
    resolved = await resolver.resolve(ALICE, "warehouse", spec)
    assert resolved.env == {"API_TOKEN": ALICE_TOKEN, "API_PORT": "5432"}
    assert ALICE_TOKEN not in repr(resolved) and "API_TOKEN<-kv/data/users/alice/api" in repr(
        resolved
    )
    assert resolved.describe()[0] == {"env": "API_TOKEN", "path": "kv/data/users/alice/api"}


@pytest.mark.parametrize(
    ("secret", "identity", "status", "message"),
    [
        ({"path": "kv/data/users/{user}/api", "env": {"X": "missing"}}, ALICE, 403,
         "secret for X: kv/data/users/alice/api has no key 'missing'."),
        ({"path": "kv/data/users/{user}/api", "env": {"X": "nested"}}, ALICE, 500,
         "secret for X: kv/data/users/alice/api: key 'nested' is not a string."),
        (WAREHOUSE, NOBODY, 403,
         "secret for WAREHOUSE_PASSWORD: kv/data/teams/{group}/warehouse: it is per group, "
         "and you are in no group."),
        (WAREHOUSE, Identity("carol", frozenset({"analysts", "ml"})), None, None),
        ({"path": "kv/data/teams/{group}/warehouse", "env": {"W": "password"}},
         Identity("dan", frozenset({"finance", "hr"})), 403,
         "secret for W: none of your groups has it (kv/data/teams/finance/warehouse: not found "
         "in the test store; kv/data/teams/hr/warehouse: permission denied by the test store)."),
    ],
)  # fmt: skip
async def test_failures_name_the_path_and_reason_never_a_value(
    secret: dict[str, Any], identity: Identity, status: int | None, message: str | None
) -> None:
    provider = DictProvider(STORE, forbidden=("kv/data/teams/hr/warehouse",))
    resolver = SecretResolver(provider)
    if status is None:  # several groups have it: the first in sorted order wins
        resolved = await resolver.resolve(identity, "warehouse", _spec(secret))
        assert resolved.env == {"WAREHOUSE_PASSWORD": ANALYSTS_PW}
        return
    with pytest.raises(GatewayError) as refused:
        await resolver.resolve(identity, "warehouse", _spec(secret))
    assert refused.value.status_code == status
    assert refused.value.message == f"Kernel 'warehouse' cannot start: {message}"
    for value in (ANALYSTS_PW, ML_PW, ALICE_TOKEN):
        assert value not in refused.value.message


async def test_compliance_hands_values_to_one_kernel_once_and_forgets_them() -> None:
    compliance = Compliance(resolver=SecretResolver(DictProvider(STORE)))
    await compliance.prepare_secrets("k1", ALICE, "warehouse", _spec(WAREHOUSE))
    assert compliance.values.redact(f"x{ANALYSTS_PW}x") == "x[secret:WAREHOUSE_PASSWORD]x"
    assert compliance.take_secret_env("k1") == {"WAREHOUSE_PASSWORD": ANALYSTS_PW}
    assert compliance.take_secret_env("k1") == {}
    await compliance.ended("k1")
    assert compliance.values.redact(ANALYSTS_PW) == ANALYSTS_PW
    without = Compliance()
    with pytest.raises(GatewayError, match="no secrets provider is configured"):
        await without.prepare_secrets("k2", ALICE, "warehouse", _spec(WAREHOUSE))


# -- the file provider -------------------------------------------------------------------------


def _write(path: Path, data: Any, mode: int = 0o600) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    os.chmod(path, mode)
    return path


async def test_the_file_provider_reads_a_0600_file_and_refuses_others(tmp_path: Path) -> None:
    path = _write(tmp_path / "secrets.yaml", STORE)
    provider = FileSecretsProvider(path)
    assert (await provider.read("kv/data/teams/ml/warehouse"))["password"] == ML_PW
    with pytest.raises(SecretNotFound, match="not found in"):
        await provider.read("kv/data/teams/hr/warehouse")
    os.chmod(path, 0o644)
    with pytest.raises(Exception, match=r"its mode is 0644, it must be 0600 \(chmod 600"):
        await provider.read("kv/data/teams/ml/warehouse")
    missing = FileSecretsProvider(tmp_path / "none.yaml")
    with pytest.raises(SecretNotFound, match="there is no secrets file"):
        await missing.read("kv/x")


async def test_a_broken_secrets_file_is_reported_without_its_content(tmp_path: Path) -> None:
    path = _write(tmp_path / "secrets.yaml", f"kv/a:\n  password: {ML_PW}\n   bad: [\n")
    with pytest.raises(Exception) as broken:
        await FileSecretsProvider(path).read("kv/a")
    assert "is not valid YAML (line" in str(broken.value) and ML_PW not in str(broken.value)


def test_startup_refuses_a_world_readable_file_naming_the_setting(tmp_path: Path) -> None:
    settings = ComplianceSettings(
        audit_log_path=str(tmp_path / "audit" / "audit.jsonl"),
        secrets_file=str(_write(tmp_path / "secrets.yaml", STORE, mode=0o640)),
    )
    with pytest.raises(ComplianceConfigError, match="secrets_file: .* its mode is 0640"):
        settings.build_compliance()
    vault = ComplianceSettings(audit_log_path=str(tmp_path / "a2.jsonl"), secrets_provider="vault")
    vault.vault_addr = ""
    with pytest.raises(ComplianceConfigError, match="vault_addr is not set"):
        vault.build_compliance()


# -- redaction ---------------------------------------------------------------------------------


def test_redactor_replaces_longest_values_first() -> None:
    redactor = Redactor([("SHORT", "abc"), ("LONG", "abcdef")])
    assert redactor.redact("x abcdef abc") == ("x [secret:LONG] [secret:SHORT]", ["LONG", "SHORT"])


def test_log_lines_and_tracebacks_lose_secret_values() -> None:
    values = SecretValues()
    values.add("k1", {"WAREHOUSE_PASSWORD": ML_PW})
    record = logging.LogRecord("t", logging.DEBUG, __file__, 1, "env: %s", ({"PW": ML_PW},), None)
    assert RedactingFilter(values).filter(record)
    assert record.getMessage() == "env: {'PW': '[secret:WAREHOUSE_PASSWORD]'}"
    try:
        raise RuntimeError(f"connect failed for {ML_PW}")
    except RuntimeError:
        import sys

        failed = logging.LogRecord("t", logging.ERROR, __file__, 1, "boom", (), sys.exc_info())
    RedactingFilter(values).filter(failed)
    assert ML_PW not in (failed.exc_text or "") and "[secret:WAREHOUSE_PASSWORD]" in (
        failed.exc_text or ""
    )
    values.discard("k1")
    assert not values.active


# -- spec.yaml ---------------------------------------------------------------------------------


def _kernelspec(**fields: Any) -> KernelSpec:
    return KernelSpec.model_validate({"name": "warehouse", "display_name": "W", "pool": "cpu",
                                      **fields})  # fmt: skip


def test_spec_secrets_are_validated_and_rendered_without_values() -> None:
    spec = _kernelspec(
        secrets=[
            {"vault": "kv/data/teams/{group}/warehouse", "env": {"WAREHOUSE_PASSWORD": "password"}},
            {"vault": "/kv/data/users/{user}/api/", "env": "API_TOKEN", "key": "token"},
        ],
        audit={"strict": True},
    )
    assert [s.metadata() for s in spec.secrets] == [
        {"path": "kv/data/teams/{group}/warehouse", "env": {"WAREHOUSE_PASSWORD": "password"},
         "optional": False},
        {"path": "kv/data/users/{user}/api", "env": {"API_TOKEN": "token"}, "optional": False},
    ]  # fmt: skip
    assert (
        spec.audit.metadata() == {"strict": True}
        and AuditPolicy.model_validate({}).metadata() == {}
    )


@pytest.mark.parametrize(
    ("secret", "reason"),
    [
        ({"vault": "kv/{team}/x", "env": "X", "key": "k"}, "only {user} and {group}"),
        ({"vault": "kv/../x", "env": "X", "key": "k"}, "must not contain '..'"),
        ({"vault": "kv/x", "env": "KERNEL_USERNAME", "key": "k"}, "is set by kernelfleet"),
        ({"vault": "kv/x", "env": "HOME", "key": "k"}, "is set by kernelfleet"),
        ({"vault": "kv/x", "env": "1BAD", "key": "k"}, "not an environment variable name"),
        ({"vault": "kv/x", "env": "X"}, "needs the secret's 'key'"),
        ({"vault": "kv/x", "env": {"X": "k"}, "key": "k"}, "leave 'key' out"),
    ],
)
def test_bad_spec_secrets_are_refused_with_a_reason(secret: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("{", r"\{").replace("}", r"\}")):
        SecretRef.model_validate(secret)


def test_resolved_secrets_never_print_values() -> None:
    resolved = ResolvedSecrets({"PW": ML_PW}, {"PW": "kv/p"})
    assert ML_PW not in repr(resolved) and ML_PW not in str(resolved)
