"""A stand-in for HashiCorp Vault's HTTP API: just enough for kernelfleet's secrets provider.

It is *not* Vault: no storage, leases, TTLs or audit devices. It answers the requests hvac
sends for what the gateway and its tests use, shaped like Vault's answers:

- KV v2 on any mount: ``GET|POST|PUT|DELETE /v1/<mount>/data/<path>``
  (read answers ``{"data": {"data": ..., "metadata": ...}}``);
- token auth: ``X-Vault-Token``; ``POST /v1/auth/token/create`` (root only, with
  ``policies``); ``GET /v1/auth/token/lookup-self``;
- ACL policies in HCL: ``PUT /v1/sys/policy/<name>`` or ``/v1/sys/policies/acl/<name>``
  with ``path "<glob>" { capabilities = [...] }`` rules (``*`` at the end, ``+`` for one
  segment, ``deny`` wins);
- Kubernetes auth: ``POST /v1/auth/<mount>/login`` with ``role`` and ``jwt``; roles are
  registered by the test with :meth:`VaultStandIn.add_kubernetes_role`.

Errors are Vault's: ``403 {"errors": ["permission denied"]}`` for a missing, expired or
unauthorised token, ``404 {"errors": []}`` for nothing there. Tests can expire a token
(:meth:`VaultStandIn.expire`) and count requests (:attr:`VaultStandIn.requests`).
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ROOT_POLICY = "root"
_RULE_RE = re.compile(r'path\s+"([^"]+)"\s*\{\s*capabilities\s*=\s*\[([^\]]*)\]\s*\}', re.S)
_METHOD_CAPABILITY = {"GET": "read", "POST": "update", "PUT": "update", "DELETE": "delete"}


def parse_policy(hcl: str) -> list[tuple[str, set[str]]]:
    """``path "glob" { capabilities = [...] }`` rules of an HCL policy."""
    rules = []
    for glob, capabilities in _RULE_RE.findall(hcl):
        rules.append((glob, {c.strip().strip('"') for c in capabilities.split(",") if c.strip()}))
    return rules


def glob_matches(glob: str, path: str) -> bool:
    """Vault's path globs: a trailing ``*`` is a prefix match, ``+`` is one segment."""
    pattern = "".join(
        "[^/]+" if part == "+" else re.escape(part) for part in re.split(r"(\+)", glob.rstrip("*"))
    )
    return re.fullmatch(pattern + (".*" if glob.endswith("*") else ""), path) is not None


class VaultStandIn:
    """One stand-in server on 127.0.0.1 (see module docstring); ``url`` once started."""

    def __init__(self, *, mounts: tuple[str, ...] = ("secret", "kv")) -> None:
        self.root_token = "root-" + secrets.token_hex(8)
        self.mounts = set(mounts)
        self.kv: dict[str, dict[str, Any]] = {}
        self.policies: dict[str, list[tuple[str, set[str]]]] = {}
        self.tokens: dict[str, list[str]] = {self.root_token: [ROOT_POLICY]}
        self.roles: dict[tuple[str, str], tuple[str, list[str]]] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- test controls -----------------------------------------------------------------------

    def start(self) -> str:
        handler = type("VaultHandler", (_VaultHandler,), {"vault": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self.url

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def add_kubernetes_role(
        self, role: str, *, jwt: str, policies: list[str], mount: str = "kubernetes"
    ) -> None:
        """Let a service account presenting ``jwt`` log in as ``role`` with ``policies``."""
        self.roles[(mount, role)] = (jwt, policies)

    def expire(self, token: str) -> None:
        """Make ``token`` invalid, as if its TTL ran out."""
        with self.lock:
            self.tokens.pop(token, None)

    def issue(self, policies: list[str]) -> str:
        """A new token with ``policies``."""
        token = "s." + secrets.token_hex(12)
        with self.lock:
            self.tokens[token] = list(policies)
        return token

    # -- decisions ---------------------------------------------------------------------------

    def allowed(self, token: str | None, path: str, capability: str) -> bool:
        with self.lock:
            policies = self.tokens.get(token or "")
        if policies is None:
            return False
        if ROOT_POLICY in policies:
            return True
        granted: set[str] = set()
        for name in policies:
            for glob, capabilities in self.policies.get(name, []):
                if glob_matches(glob, path):
                    granted |= capabilities
        return "deny" not in granted and (capability in granted or (
            capability == "update" and "create" in granted))  # fmt: skip


def _kv_metadata(version: int) -> dict[str, Any]:
    now = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
    return {"created_time": now, "custom_metadata": None, "deletion_time": "",
            "destroyed": False, "version": version}  # fmt: skip


class _VaultHandler(BaseHTTPRequestHandler):
    vault: VaultStandIn

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _answer(self, status: int, body: Any = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        value = json.loads(self.rfile.read(length) or b"{}") if length else {}
        return value if isinstance(value, dict) else {}

    def _envelope(self, **fields: Any) -> dict[str, Any]:
        return {"request_id": str(uuid.uuid4()), "lease_id": "", "renewable": False,
                "lease_duration": 0, "data": None, "wrap_info": None, "warnings": None,
                "auth": None, **fields}  # fmt: skip

    def _denied(self) -> None:
        self._answer(403, {"errors": ["permission denied"]})

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0].removeprefix("/v1/").strip("/")
        self.vault.requests.append((method, path))
        token = self.headers.get("X-Vault-Token")
        login = re.fullmatch(r"auth/([^/]+)/login", path)
        if login and method in ("POST", "PUT"):
            return self._kubernetes_login(login.group(1))
        if path == "auth/token/lookup-self":
            return self._lookup_self(token)
        if path == "auth/token/create":
            return self._create_token(token)
        policy = re.fullmatch(r"sys/(?:policy|policies/acl)/([^/]+)", path)
        if policy and method in ("POST", "PUT"):
            return self._write_policy(token, policy.group(1))
        return self._kv(method, path, token)

    do_GET = lambda self: self._route("GET")  # noqa: E731
    do_POST = lambda self: self._route("POST")  # noqa: E731
    do_PUT = lambda self: self._route("PUT")  # noqa: E731
    do_DELETE = lambda self: self._route("DELETE")  # noqa: E731

    def _kv(self, method: str, path: str, token: str | None) -> None:
        mount, _, rest = path.partition("/data/")
        if mount not in self.vault.mounts or not rest:
            return self._answer(404, {"errors": [f"no handler for route '{path}'"]})
        if not self.vault.allowed(token, path, _METHOD_CAPABILITY[method]):
            return self._denied()
        store = self.vault.kv
        if method == "GET":
            entry = store.get(path)
            if entry is None:
                return self._answer(404, {"errors": []})
            return self._answer(200, self._envelope(data=entry))
        if method == "DELETE":
            store.pop(path, None)
            return self._answer(204)
        version = int((store.get(path) or {}).get("metadata", {}).get("version", 0)) + 1
        store[path] = {"data": dict(self._body().get("data") or {}),
                       "metadata": _kv_metadata(version)}  # fmt: skip
        return self._answer(200, self._envelope(data=store[path]["metadata"]))

    def _lookup_self(self, token: str | None) -> None:
        with self.vault.lock:
            policies = self.vault.tokens.get(token or "")
        if policies is None:
            return self._denied()
        return self._answer(200, self._envelope(data={"id": token, "policies": policies}))

    def _create_token(self, token: str | None) -> None:
        if not self.vault.allowed(token, "auth/token/create", "update"):
            return self._denied()
        policies = [str(p) for p in self._body().get("policies") or []]
        return self._answer(200, self._envelope(auth=self._auth(self.vault.issue(policies),
                                                                policies)))  # fmt: skip

    def _write_policy(self, token: str | None, name: str) -> None:
        if not self.vault.allowed(token, f"sys/policy/{name}", "update"):
            return self._denied()
        self.vault.policies[name] = parse_policy(str(self._body().get("policy") or ""))
        return self._answer(204)

    def _kubernetes_login(self, mount: str) -> None:
        body = self._body()
        role = self.vault.roles.get((mount, str(body.get("role"))))
        if role is None or role[0] != body.get("jwt"):
            return self._denied()
        token = self.vault.issue(role[1])
        return self._answer(200, self._envelope(auth=self._auth(token, role[1])))

    @staticmethod
    def _auth(token: str, policies: list[str]) -> dict[str, Any]:
        return {"client_token": token, "accessor": secrets.token_hex(8), "policies": policies,
                "token_policies": policies, "lease_duration": 600, "renewable": True}  # fmt: skip
