"""gateway.server.identity and auth helpers: hub tokens → identities, cached, never logged."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from gateway.server.auth import scrub_uri
from gateway.server.errors import GatewayError, error_body
from gateway.server.identity import HubIdentityResolver, Identity, token_from_request

MODELS: dict[str, dict[str, Any]] = {
    "alice-token": {"kind": "user", "name": "alice", "admin": False, "groups": ["ml"]},
    "ops-token": {"kind": "user", "name": "ops", "admin": True, "groups": []},
    "gateway-token": {"kind": "service", "name": "kernelfleet-gateway"},
    "culler-token": {"kind": "service", "name": "idle-culler"},
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class HubStandIn:
    """A hub API stand-in as an httpx transport; counts calls per token."""

    def __init__(self, *, down: bool = False) -> None:
        self.calls: list[str] = []
        self.down = down

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("refused", request=request)
        token = request.headers["Authorization"].removeprefix("token ")
        self.calls.append(token)
        assert request.url.path == "/hub/api/user"
        if token not in MODELS:
            return httpx.Response(403, json={"status": 403})
        return httpx.Response(200, json=MODELS[token])


def resolver(hub: HubStandIn, clock: FakeClock | None = None) -> HubIdentityResolver:
    return HubIdentityResolver(
        "http://hub/hub/api/",
        ttl_s=60,
        admin_token="gateway-token",
        transport=httpx.MockTransport(hub),
        clock=clock or FakeClock(),
    )


async def test_user_token_resolves_to_name_groups_admin_and_is_cached() -> None:
    hub, clock = HubStandIn(), FakeClock()
    r = resolver(hub, clock)
    alice = Identity(name="alice", groups=frozenset({"ml"}), admin=False)
    assert await r.resolve("alice-token") == alice
    assert await r.resolve("alice-token") == alice
    assert hub.calls == ["alice-token"]
    clock.now += 61
    await r.resolve("alice-token")
    assert hub.calls == ["alice-token", "alice-token"]
    assert (await r.resolve("ops-token")).admin
    await r.aclose()


async def test_concurrent_requests_share_one_hub_call() -> None:
    hub = HubStandIn()
    r = resolver(hub)
    names = await asyncio.gather(*(r.resolve("alice-token") for _ in range(5)))
    assert {i.name for i in names} == {"alice"} and hub.calls == ["alice-token"]
    await r.aclose()


async def test_missing_and_invalid_tokens_are_401() -> None:
    hub = HubStandIn()
    r = resolver(hub)
    for token in (None, "", "wrong"):
        with pytest.raises(GatewayError) as info:
            await r.resolve(token)
        assert info.value.status_code == 401
    with pytest.raises(GatewayError):
        await r.resolve("wrong")
    assert hub.calls == ["wrong"]  # invalid tokens are remembered briefly too
    await r.aclose()


async def test_gateway_service_token_is_admin_and_other_services_are_refused() -> None:
    r = resolver(HubStandIn())
    service = await r.resolve("gateway-token")
    assert service.admin and service.name == "kernelfleet-gateway"
    with pytest.raises(GatewayError) as info:
        await r.resolve("culler-token")
    assert info.value.status_code == 403 and "idle-culler" in info.value.message
    await r.aclose()


async def test_hub_down_is_503_without_the_token_in_any_message() -> None:
    r = resolver(HubStandIn(down=True))
    with pytest.raises(GatewayError) as info:
        await r.resolve("alice-token")
    assert info.value.status_code == 503
    assert "alice-token" not in info.value.message + str(info.value)
    await r.aclose()


@pytest.mark.parametrize(
    ("header", "query", "token"),
    [
        ("token abc", None, "abc"),
        ("Bearer abc", None, "abc"),
        ("Basic abc", None, None),
        (None, "xyz", "xyz"),
        ("token abc", "xyz", "abc"),
        (None, None, None),
    ],
)
def test_token_from_request(header: str | None, query: str | None, token: str | None) -> None:
    assert token_from_request(header, query) == token


def test_scrub_uri_hides_token_values() -> None:
    scrubbed = scrub_uri("/api/kernels/k/channels?session_id=s1&token=abc123")
    assert "abc123" not in scrubbed and "session_id=s1" in scrubbed
    assert scrub_uri("/api/kernels") == "/api/kernels"


def test_error_body_has_reason_message_and_code_never_a_traceback() -> None:
    error = GatewayError(409, "All 2 GPUs in pool gpu are in use.", code="pool_full")
    assert error_body(409, error) == {
        "reason": "Conflict",
        "message": "All 2 GPUs in pool gpu are in use.",
        "error": "pool_full",
    }
    body = error_body(500, KeyError("iopub"))
    assert "iopub" not in body["message"] and "traceback" not in body
    assert GatewayError(400, "100% wrong").message == "100% wrong"
