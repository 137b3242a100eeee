"""kernelfleet.yaml: the shipped file loads; each kind of mistake names file, field, why."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kernelfleet.config import load_config, parse_duration, parse_memory
from kernelfleet.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_shipped_config_has_the_demo_users_and_pools() -> None:
    config = load_config(REPO / "kernelfleet.yaml")
    assert config.groups() == {"analysts": ["alice", "bob"], "ml": ["carol"]}
    assert config.admins == {"ops"}
    assert config.pools["gpu"].gpus == 2 and config.pools["gpu"].simulated_gpus
    assert config.quotas.default.kernels == 3
    assert config.state_dir == REPO / ".kernelfleet"


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({"ports": {"hub": 70000}}, "ports.hub", "not a TCP port"),
        (
            {"ports": {"gateway": 9000, "hub_api": 9000}},
            "ports",
            "ports.hub_api and ports.gateway are both 9000",
        ),
        ({"pools": {"gpu": {"gpus": -1}}}, "pools.gpu.gpus", "must not be negative"),
        ({"pools": {"gpu": {"memory": "lots"}}}, "pools.gpu.memory", "not a memory size"),
        ({"pools": {}}, "pools", "at least one pool"),
        ({"backend": "docker"}, "backend", "'local' or 'kubernetes'"),
        ({"users": {"alice": {"group": ["x"]}}}, "users.alice.group", "Extra inputs"),
    ],
)
def test_bad_settings_name_file_field_and_reason(
    tmp_path: Path, change: dict, field: str, reason: str
) -> None:
    path = tmp_path / "kernelfleet.yaml"
    path.write_text(yaml.safe_dump(change))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert error.value.file == str(path)
    assert error.value.field == field
    assert reason in error.value.reason
    assert str(path) in str(error.value)


def test_malformed_yaml_is_reported_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "kernelfleet.yaml"
    path.write_text("pools: [cpu\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_quantities() -> None:
    assert parse_memory("2Gi") == 2 * 2**30
    assert parse_memory("512M") == 512 * 10**6
    assert parse_duration("30m") == 1800 and parse_duration("8h") == 28800
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("30 minutes")
