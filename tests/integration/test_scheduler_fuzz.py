"""Property-based fuzzing of the scheduler's HTTP API from the OpenAPI schema it serves.

Schemathesis generates requests for every operation (valid and invalid bodies, query and
path parameters) and sends them to a real scheduler process on a real Redis, with the
service token; no answer may be a 5xx. Pools are large so that requests that wait for
room never wait long.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from kernelfleet.config import PlatformConfig
from scheduler.app import create_app
from scheduler.pools import resolve_pools
from scheduler.service import Scheduler
from scheduler.store import connect
from tests.support.ports import free_port
from tests.support.redis_server import running_redis
from tests.support.scheduler_stack import SERVICE_TOKEN, Stack

REPO = Path(__file__).resolve().parents[2]
AUTH = {"Authorization": f"token {SERVICE_TOKEN}"}


@pytest.fixture(scope="module")
def scheduler_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("fuzz")
    with running_redis(folder / "redis") as redis:
        config = {
            "host": "127.0.0.1",
            "state_dir": "state",
            "kernelspecs_dir": str(REPO / "kernelspecs"),
            "ports": {
                "scheduler": free_port(),
                "redis": redis.port,
                "hub_api": free_port(),
                "gateway": free_port(),
            },
            "pools": {
                "cpu": {"cpus": 100000, "memory": "1000Ti"},
                "gpu": {"cpus": 100000, "memory": "1000Ti", "gpus": 100000, "simulated_gpus": True},
            },
            "quotas": {"default": {"kernels": 1000}},
        }
        (folder / "kernelfleet.yaml").write_text(yaml.safe_dump(config))
        (folder / "state" / "secrets").mkdir(parents=True)
        (folder / "state" / "secrets" / "scheduler_token").write_text(SERVICE_TOKEN)
        stack = Stack(folder=folder, redis=redis, port=config["ports"]["scheduler"])
        stack.start()
        try:
            yield stack.url
        finally:
            stack.stop()
            assert "Traceback" not in stack.log(), stack.log()


def _served_schema() -> dict:
    """The OpenAPI document the scheduler serves (the process under test serves the same)."""
    platform = PlatformConfig.model_validate({"pools": {"cpu": {"cpus": 1, "memory": 1}}})
    scheduler = Scheduler.from_config(
        connect("redis://127.0.0.1:1/0"),
        platform,
        pools=resolve_pools(platform),
        kernelspecs={},
        location="nowhere",
    )
    return create_app(scheduler, token="unused").openapi()


schema = schemathesis.openapi.from_dict(_served_schema())


@schema.parametrize()
@settings(
    max_examples=30,
    database=None,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)
def test_no_request_makes_the_scheduler_fail(case: schemathesis.Case, scheduler_url: str) -> None:
    case.call_and_validate(
        base_url=scheduler_url, headers=AUTH, checks=[not_a_server_error], timeout=30
    )


def test_the_process_serves_the_schema_that_was_fuzzed(scheduler_url: str) -> None:
    served = httpx.get(f"{scheduler_url}/openapi.json").json()
    assert served["paths"].keys() == schema.raw_schema["paths"].keys()
