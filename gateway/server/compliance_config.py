"""The gateway's audit and secrets settings (traits of ``KernelfleetGatewayApp``).

:class:`ComplianceSettings` is mixed into the app, so these are configured like every
other setting: ``c.KernelfleetGatewayApp.audit_strict = True``. :meth:`build_compliance`
turns them into a :class:`~gateway.server.compliance.Compliance` at start-up and fails with
a :class:`ComplianceConfigError` naming the setting when one is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_data_dir
from traitlets import Bool, Enum, Float, HasTraits, Integer, TraitError, Unicode, default, validate

from .audit import AuditTrail
from .audit_file import AuditFileError, ChainFile
from .audit_sink import AuditSink, HttpShipper, Shipper
from .compliance import Compliance
from .redaction import SecretValues
from .secrets import SecretResolver, SecretsProvider, SecretsUnavailable
from .secrets_file import FileSecretsProvider
from .secrets_vault import DEFAULT_JWT_PATH, KubernetesAuth, TokenAuth, VaultSecretsProvider


class ComplianceConfigError(Exception):
    """An audit or secrets setting cannot be used: which one, and why."""


def _data_path(*parts: str) -> str:
    return os.path.join(jupyter_data_dir(), "kernelfleet", *parts)


class ComplianceSettings(HasTraits):
    """Traits for the audit trail and the secrets provider (see docs/compliance.md)."""

    audit_log_path = Unicode(
        help="""The audit chain's current file (JSON Lines, mode 0600, in a 0700 folder).
        Rotated files and audit.jsonl.head/.lock live beside it. One gateway process per file.
        Default: <jupyter data dir>/kernelfleet/audit/audit.jsonl; `kernelfleet up` uses
        <state_dir>/audit/audit.jsonl.""",
    ).tag(config=True)

    @default("audit_log_path")
    def _default_audit_log_path(self) -> str:
        return _data_path("audit", "audit.jsonl")

    audit_code_mode = Enum(
        ["full", "hash"],
        "full",
        help="""What an execute record keeps of the code: 'full' (the text, secrets
        redacted) or 'hash' (only its SHA-256 and length). A kernelspec's audit.code wins.""",
    ).tag(config=True)

    audit_strict = Bool(
        False,
        help="""Strict mode for every kernelspec that does not set audit.strict itself: code
        reaches a kernel only once its record is on disk; while the log cannot be written,
        executions are refused with an error reply and such kernels do not start.""",
    ).tag(config=True)

    audit_buffer_size = Integer(
        10_000,
        help="""Audit records held in memory while the disk is slow or failing. When full,
        recording waits up to audit_buffer_timeout seconds, then drops (counted, and an
        audit_gap record says how many). Raise it for bursty, busy gateways.""",
    ).tag(config=True)

    audit_buffer_timeout = Float(
        5.0, help="Seconds a record waits for room in a full audit buffer before it is dropped."
    ).tag(config=True)

    audit_strict_timeout = Float(
        5.0,
        help="Seconds a strict execution waits for its record to be written before refusal.",
    ).tag(config=True)

    audit_coalesce = Float(
        0.05,
        help="""Seconds non-strict audit records wait to be written together. Writing each
        record as it came cost the gateway ~1.4 ms of CPU per executed cell, competing
        with the cell's kernel messages (bench/README.md). Strict records never wait;
        0 writes each batch at once.""",
    ).tag(config=True)

    audit_rotate_bytes = Integer(
        100 * 2**20,
        help="""Size in bytes at which the current audit file is rotated to
        audit.<first seq>.jsonl (the hash chain continues). Nothing is ever deleted.""",
    ).tag(config=True)

    audit_fsync = Bool(
        False, help="fsync after every batch: survives a power cut, costs a disk flush per batch."
    ).tag(config=True)

    audit_ship_url = Unicode(
        "",
        help="""Optional SIEM collector URL: every written batch is POSTed there as JSON Lines
        (application/x-ndjson), retried on failure. The local file stays the source of truth.""",
    ).tag(config=True)

    audit_ship_token_file = Unicode(
        "", help="File with a token sent to audit_ship_url as 'Authorization: Bearer <token>'."
    ).tag(config=True)

    @validate("audit_buffer_size", "audit_rotate_bytes")
    def _validate_positive(self, proposal: Any) -> int:
        value = int(proposal["value"])
        if value < 1:
            raise TraitError(f"{proposal['trait'].name} must be 1 or more, not {value}")
        return value

    @validate("audit_buffer_timeout", "audit_strict_timeout", "audit_coalesce")
    def _validate_timeout(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if value < 0:
            raise TraitError(f"{proposal['trait'].name} must be 0 or more seconds, not {value}")
        return value

    secrets_provider = Enum(
        ["file", "vault", "none"],
        "file",
        help="""Where kernelspec secrets come from: 'file' (secrets_file, the embedded
        default), 'vault' (vault_addr, through hvac), or 'none' (kernelspecs that declare
        secrets do not start).""",
    ).tag(config=True)

    secrets_file = Unicode(
        help="""YAML file of secret path -> {key: value} for the 'file' provider; refused
        unless mode 0600. Default: <jupyter data dir>/kernelfleet/secrets.yaml; `kernelfleet
        up` uses <state_dir>/secrets.yaml.""",
    ).tag(config=True)

    @default("secrets_file")
    def _default_secrets_file(self) -> str:
        return _data_path("secrets.yaml")

    vault_addr = Unicode(
        help="Vault's URL (e.g. https://vault.example:8200). Default: $VAULT_ADDR."
    ).tag(config=True)

    @default("vault_addr")
    def _default_vault_addr(self) -> str:
        return os.environ.get("VAULT_ADDR", "")

    vault_auth = Enum(
        ["token", "kubernetes"],
        "token",
        help="""How the gateway logs in to Vault: 'token' (vault_token_file, else
        $VAULT_TOKEN) or 'kubernetes' (its service account JWT, vault_kubernetes_role).""",
    ).tag(config=True)

    vault_token_file = Unicode("", help="File holding the gateway's Vault token.").tag(config=True)

    vault_kubernetes_role = Unicode(
        "", help="Vault role for Kubernetes auth (required with vault_auth = 'kubernetes')."
    ).tag(config=True)

    vault_kubernetes_jwt_file = Unicode(
        DEFAULT_JWT_PATH, help="The service account token presented to Vault's Kubernetes auth."
    ).tag(config=True)

    vault_kubernetes_mount = Unicode(
        "kubernetes", help="Mount path of Vault's Kubernetes auth method."
    ).tag(config=True)

    vault_namespace = Unicode("", help="Vault Enterprise namespace, if any.").tag(config=True)

    vault_ca_cert = Unicode(
        "", help="CA bundle to verify Vault's TLS certificate (default: the system's)."
    ).tag(config=True)

    vault_timeout = Float(10.0, help="Seconds to wait for Vault before a start fails.").tag(
        config=True
    )

    # -- building ----------------------------------------------------------------------------

    def build_compliance(self) -> Compliance:
        """The Compliance these settings describe; ComplianceConfigError if they cannot work."""
        provider = self._build_provider()
        sink = self._build_sink()  # last: it takes the audit file's lock
        trail = AuditTrail(
            sink, code_mode=self.audit_code_mode, strict=self.audit_strict, values=SecretValues()
        )
        return Compliance(trail, SecretResolver(provider) if provider is not None else None)

    def _build_sink(self) -> AuditSink:
        try:
            chain = ChainFile(
                Path(os.path.abspath(self.audit_log_path)),
                rotate_bytes=self.audit_rotate_bytes,
                fsync=self.audit_fsync,
            )
        except AuditFileError as e:
            raise ComplianceConfigError(f"audit_log_path: {e}") from e
        return AuditSink(
            chain,
            capacity=self.audit_buffer_size,
            buffer_timeout_s=self.audit_buffer_timeout,
            durable_timeout_s=self.audit_strict_timeout,
            shipper=self._build_shipper(),
            coalesce_s=self.audit_coalesce,
        )

    def _build_shipper(self) -> Shipper | None:
        if not self.audit_ship_url:
            return None
        token = _read_file(self.audit_ship_token_file, "audit_ship_token_file")
        return HttpShipper(self.audit_ship_url, token=token)

    def _build_provider(self) -> SecretsProvider | None:
        if self.secrets_provider == "none":
            return None
        if self.secrets_provider == "file":
            provider = FileSecretsProvider(os.path.abspath(self.secrets_file))
            try:
                provider.check()
            except SecretsUnavailable as e:
                raise ComplianceConfigError(f"secrets_file: {e.reason}") from e
            return provider
        return self._build_vault()

    def _build_vault(self) -> VaultSecretsProvider:
        if not self.vault_addr:
            raise ComplianceConfigError("secrets_provider is 'vault' but vault_addr is not set")
        auth: TokenAuth | KubernetesAuth
        if self.vault_auth == "kubernetes":
            if not self.vault_kubernetes_role:
                raise ComplianceConfigError(
                    "vault_auth is 'kubernetes' but vault_kubernetes_role is not set"
                )
            auth = KubernetesAuth(
                self.vault_kubernetes_role,
                jwt_path=self.vault_kubernetes_jwt_file,
                mount=self.vault_kubernetes_mount,
            )
        else:
            token = _read_file(self.vault_token_file, "vault_token_file")
            token = token or os.environ.get("VAULT_TOKEN", "")
            if not token:
                raise ComplianceConfigError(
                    "vault_auth is 'token' but neither vault_token_file nor $VAULT_TOKEN is set"
                )
            auth = TokenAuth(token)
        return VaultSecretsProvider(
            self.vault_addr,
            auth=auth,
            namespace=self.vault_namespace,
            verify=self.vault_ca_cert or True,
            timeout_s=self.vault_timeout,
        )


def _read_file(path: str, setting: str) -> str:
    """The stripped content of ``path`` ('' for no path); ComplianceConfigError if unreadable."""
    if not path:
        return ""
    try:
        return Path(path).read_text().strip()
    except OSError as e:
        raise ComplianceConfigError(f"{setting}: cannot read {path}: {e.strerror}") from e
