"""A second `make up` is fast: environments whose inputs did not change are not reinstalled."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernelfleet import bootstrap


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    seen: list[list[str]] = []

    def fake_run(cmd: list[str], *, what: str, cwd: Path | None = None) -> None:
        seen.append(cmd)
        if cmd[1:3] == ["-m", "venv"]:
            python = Path(cmd[3]) / "bin" / "python"
            python.parent.mkdir(parents=True)
            python.touch()

    monkeypatch.setattr(bootstrap, "_run", fake_run)
    return seen


def test_venv_is_built_once_and_rebuilt_when_pyproject_changes(
    tmp_path: Path, calls: list[list[str]]
) -> None:
    (tmp_path / "pyproject.toml").write_text("[project]\nname='x'\n")
    venv = tmp_path / ".venv-kernel"
    messages: list[str] = []
    bootstrap.ensure_venv(venv, ["ipykernel"], root=tmp_path, progress=messages.append)
    assert [c[1:3] for c in calls] == [["-m", "venv"], ["-m", "pip"]]
    assert messages and "first time" in messages[0]

    calls.clear()
    bootstrap.ensure_venv(venv, ["ipykernel"], root=tmp_path, progress=messages.append)
    assert calls == []  # nothing changed: no pip, no venv

    (tmp_path / "pyproject.toml").write_text("[project]\nname='x'\nversion='2'\n")
    bootstrap.ensure_venv(venv, ["ipykernel"], root=tmp_path, progress=messages.append)
    assert [c[1:3] for c in calls] == [["-m", "pip"]]  # updated in place


def test_failed_install_leaves_no_stamp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pyproject.toml").write_text("[project]\nname='x'\n")

    def failing_run(cmd: list[str], *, what: str, cwd: Path | None = None) -> None:
        if "pip" in cmd:
            raise bootstrap.StartupError(f"{what} failed")
        (tmp_path / ".venv-x" / "bin").mkdir(parents=True)
        (tmp_path / ".venv-x" / "bin" / "python").touch()

    monkeypatch.setattr(bootstrap, "_run", failing_run)
    with pytest.raises(bootstrap.StartupError, match="pip install"):
        bootstrap.ensure_venv(tmp_path / ".venv-x", ["nope"], root=tmp_path, progress=print)
    assert not (tmp_path / ".venv-x" / bootstrap.STAMP).exists()
