"""Check curated kernelspecs, then render them into EG kernelspec directories.

Checking finds every problem of every ``kernelspecs/<name>/spec.yaml`` (file, field, why),
including those that need kernelfleet.yaml (pool exists and has GPUs, groups have members).
A *renderer* turns one valid spec into the files of its EG kernelspec directory; a backend
is one entry in :data:`RENDERERS` (issue #5 adds ``"kubernetes"``, returning kernel.json
plus a pod template). :func:`build` writes ``<output>/kernels/<name>/`` in one swap.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ValidationError

from ..config import PlatformConfig
from ..errors import ConfigError, KernelfleetError
from .spec import EVERYONE, SPEC_FILE, KernelSpec, load_kernelspec

LOCAL_PROCESS_PROXY = "enterprise_gateway.services.processproxies.processproxy.LocalProcessProxy"
KERNEL_JSON = "kernel.json"
_LAUNCHER = ["-m", "ipykernel_launcher", "-f", "{connection_file}"]
BACKENDS = ("local", "kubernetes")
# Marks an output folder as ours: a build replaces the whole folder, so it refuses to
# replace one that it did not write (a mistyped --output must not delete someone's files).
MARKER = ".kernelfleet-kernelspecs"
_MARKER_TEXT = b"Rendered by `kernelfleet kernelspecs build` from kernelspecs/*/spec.yaml.\n"
# Placeholders for broken required fields, so the checks that need a whole spec still run.
_PLACEHOLDERS = {"name": "placeholder", "display_name": "placeholder"}

Severity = Literal["error", "warning"]
Files = dict[str, bytes]
Renderer = Callable[[KernelSpec, PlatformConfig], Files]


# --- checking ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a kernelspec: where (file, field) and why."""

    file: Path
    field: str
    reason: str
    severity: Severity = "error"

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def describe(self) -> str:
        """``<file>: <field>: <reason>``, the file relative to the working folder if inside it."""
        where = _shown(self.file) + (f": {self.field}" if self.field else "")
        return f"{where}: {self.reason}"


@dataclass(frozen=True)
class SpecCheck:
    """The outcome for one kernelspec folder: the spec if it loaded, and its problems."""

    name: str
    spec: KernelSpec | None
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        """Loaded and free of errors (warnings allowed): it can be rendered."""
        return self.spec is not None and not any(p.is_error for p in self.problems)


@dataclass(frozen=True)
class CheckResult:
    """The outcome for a whole kernelspecs folder."""

    checks: tuple[SpecCheck, ...]
    general: tuple[Problem, ...] = ()

    @property
    def problems(self) -> list[Problem]:
        return [*self.general, *(p for check in self.checks for p in check.problems)]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.is_error]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if not p.is_error]

    @property
    def specs(self) -> dict[str, KernelSpec]:
        """The renderable specs, by name (all of them when there are no errors)."""
        return {c.name: c.spec for c in self.checks if c.ok and c.spec is not None}


class InvalidKernelspecs(KernelfleetError):
    """The kernelspecs have errors; ``problems`` lists all of them (warnings included)."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        errors = [p for p in problems if p.is_error]
        more = len(errors) - 1
        suffix = f" (and {more} more; see `kernelfleet kernelspecs validate`)" if more else ""
        super().__init__(errors[0].describe() + suffix)


def check_kernelspecs(config: PlatformConfig) -> CheckResult:
    """Check every ``<kernelspecs_dir>/<name>/spec.yaml`` against itself and the config."""
    folder = config.kernelspecs_dir
    if not folder.is_dir():
        reason = "kernelspecs folder not found (kernelspecs_dir in kernelfleet.yaml)"
        return CheckResult((), (Problem(folder, "", reason),))
    general: list[Problem] = []
    checks: list[SpecCheck] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        if (entry / SPEC_FILE).is_file():
            checks.append(check_kernelspec(entry, config))
        else:
            reason = f"no {SPEC_FILE} in this folder, so it is not a kernelspec (skipped)"
            general.append(Problem(entry, "", reason, "warning"))
    if not checks:
        reason = f"no kernelspecs here; add one as <name>/{SPEC_FILE}"
        general.append(Problem(folder, "", reason))
    return CheckResult(tuple(checks), tuple(general))


def check_kernelspec(spec_dir: Path, config: PlatformConfig) -> SpecCheck:
    """Every problem of one kernelspec folder, not just the first."""
    try:
        spec = load_kernelspec(spec_dir)
    except ConfigError as error:
        return SpecCheck(spec_dir.name, None, tuple(_problems_of_broken(spec_dir, error, config)))
    return SpecCheck(spec.name, spec, tuple(_platform_problems(spec_dir / SPEC_FILE, spec, config)))


def _problems_of_broken(
    spec_dir: Path, error: ConfigError, config: PlatformConfig
) -> list[Problem]:
    """load_kernelspec stopped at the first problem; find the others in the same file."""
    spec_file = spec_dir / SPEC_FILE
    if not error.field:  # unreadable, not YAML, not a mapping: nothing more to look at
        return [_problem_of_unreadable(spec_file, error)]
    raw = yaml.safe_load(spec_file.read_text())
    # Other than a pydantic error (all of which come back below) the error is the name check.
    first = Problem(Path(error.file), error.field, error.reason)
    problems = [] if isinstance(error.__cause__, ValidationError) else [first]
    candidate = {**raw, "name": spec_dir.name, "source": spec_file}
    try:
        KernelSpec.model_validate(candidate)
        details: list[Any] = []
    except ValidationError as e:
        details = list(e.errors())
    problems += [_problem_of_detail(spec_file, detail) for detail in details]
    salvaged = _salvage(candidate, details)
    if salvaged is not None:
        problems += _platform_problems(spec_file, salvaged, config)
    return problems


def _salvage(candidate: dict[str, Any], details: list[Any]) -> KernelSpec | None:
    """The spec minus its broken fields, or None when a required field cannot be filled."""
    kept = copy.deepcopy(candidate)
    for detail in details:
        _drop(kept, detail["loc"])
    for field, placeholder in _PLACEHOLDERS.items():
        kept.setdefault(field, placeholder)
    try:
        return KernelSpec.model_validate(kept)
    except ValidationError:
        return None  # the pool is missing or broken: already reported


def _drop(data: dict[str, Any], loc: tuple[Any, ...]) -> None:
    """Remove the value at ``loc``: the innermost mapping key, else the whole top field."""
    if not loc:
        return
    parent: Any = data
    for part in loc[:-1]:
        if not isinstance(parent, dict) or part not in parent:
            data.pop(loc[0], None)
            return
        parent = parent[part]
    if isinstance(parent, dict):
        parent.pop(loc[-1], None)
    else:
        data.pop(loc[0], None)


def _platform_problems(spec_file: Path, spec: KernelSpec, config: PlatformConfig) -> list[Problem]:
    """What a valid spec.yaml can still get wrong against kernelfleet.yaml."""
    problems = _pool_problems(spec_file, spec, config)
    if spec.warm_target < 0:
        reason = f"warm_target must not be negative, got {spec.warm_target}"
        problems.append(Problem(spec_file, "warm_target", reason))
    problems += _group_warnings(spec_file, spec, config)
    if config.backend == "local" and spec.local.python is not None:
        python = local_python(spec, config)
        if not python.exists():
            reason = f"{python} does not exist (yet); kernels of this spec will fail to start"
            problems.append(Problem(spec_file, "local.python", reason, "warning"))
    asset = spec_file.parent / KERNEL_JSON
    if asset.exists():
        reason = "is rendered from spec.yaml by `kernelfleet kernelspecs build`; remove this file"
        problems.append(Problem(asset, "", reason))
    return problems


def _pool_problems(spec_file: Path, spec: KernelSpec, config: PlatformConfig) -> list[Problem]:
    pool = config.pools.get(spec.pool)
    if pool is None:
        known = ", ".join(sorted(config.pools))
        reason = f"pool '{spec.pool}' is not in kernelfleet.yaml (known: {known})"
        return [Problem(spec_file, "pool", reason)]
    wanted = spec.resources.gpus
    if wanted == 0 or pool.gpus == "host":  # "host" is only known on the machine itself
        return []
    if pool.gpus == 0:
        gpu_pools = sorted(n for n, p in config.pools.items() if p.gpus == "host" or p.gpus > 0)
        hint = f"; use a GPU pool ({', '.join(gpu_pools)})" if gpu_pools else ""
        reason = f"asks for {_gpus(wanted)} but pool '{spec.pool}' has no GPUs{hint}"
        return [Problem(spec_file, "resources.gpus", reason)]
    if wanted > pool.gpus:
        reason = f"asks for {_gpus(wanted)} but pool '{spec.pool}' has only {pool.gpus}"
        return [Problem(spec_file, "resources.gpus", reason)]
    return []


def _gpus(count: int) -> str:
    return f"{count} GPU" if count == 1 else f"{count} GPUs"


def _group_warnings(spec_file: Path, spec: KernelSpec, config: PlatformConfig) -> list[Problem]:
    # Only the embedded authenticator lists its users here; LDAP/OAuth groups live elsewhere.
    if config.authenticator.kind != "kernelfleet":
        return []
    empty = [g for g in spec.groups if g != EVERYONE and g not in config.groups()]
    reason = "no user in kernelfleet.yaml is in group '{}', so only admins see this"
    return [Problem(spec_file, "groups", reason.format(g), "warning") for g in empty]


def _problem_of_unreadable(spec_file: Path, error: ConfigError) -> Problem:
    cause = error.__cause__
    mark = getattr(cause, "problem_mark", None)
    if isinstance(cause, yaml.YAMLError) and mark is not None:
        what = getattr(cause, "problem", None) or "syntax error"
        field = f"line {mark.line + 1}, column {mark.column + 1}"
        return Problem(spec_file, field, f"not valid YAML: {what}")
    return Problem(Path(error.file), "", " ".join(error.reason.split()))


def _problem_of_detail(spec_file: Path, detail: Any) -> Problem:
    """One pydantic error as a Problem, worded for someone editing spec.yaml."""
    loc = tuple(detail["loc"])
    field = ".".join(str(part) for part in loc) or "(top level)"
    kind = detail["type"]
    if kind == "extra_forbidden":
        reason = _unknown_field_reason(str(loc[-1]), _known_fields(loc[:-1]))
    elif kind == "missing":
        reason = "required field is missing"
    elif kind == "value_error" and "error" in detail.get("ctx", {}):
        reason = str(detail["ctx"]["error"])
    else:
        shown = repr(detail.get("input"))
        reason = f"{detail['msg']}, got {shown if len(shown) <= 60 else shown[:57] + '...'}"
    return Problem(spec_file, field, reason)


def _unknown_field_reason(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        return f"unknown field '{name}'; did you mean '{close[0]}'?"
    return f"unknown field '{name}'; known fields: {', '.join(known)}"


def _known_fields(loc: tuple[Any, ...]) -> list[str]:
    """Field names a spec.yaml may use at ``loc`` (e.g. ("resources",) -> cpus, memory, gpus)."""
    model: type[BaseModel] = KernelSpec
    for part in loc:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(str(part))
        nested = _model_in(info.annotation) if info else None
        if nested is None:
            return []
        model = nested
    return sorted(name for name in model.model_fields if name != "source")


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):  # list[SecretRef], SecretRef | None
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# --- rendering --------------------------------------------------------------------------


def local_python(spec: KernelSpec, config: PlatformConfig) -> Path:
    """The absolute interpreter of a local kernel; relative paths start at the config's folder.

    Symlinks are kept on purpose: a virtualenv's ``bin/python`` is a symlink to the base
    interpreter, and only the link path makes Python use the virtualenv.
    """
    python = spec.local.python
    if python is None:
        return config.kernel_python
    return Path(os.path.abspath(config.root / python.expanduser()))


def kernelfleet_metadata(spec: KernelSpec, config: PlatformConfig) -> dict[str, Any]:
    """``metadata.kernelfleet``: the policy gateway.server and the scheduler read."""
    pool = config.pools[spec.pool]
    metadata: dict[str, Any] = {
        "name": spec.name,
        "pool": spec.pool,
        "groups": list(spec.groups),
        "resources": spec.resources.model_dump(),  # cpus, memory (bytes), gpus
        "idle_timeout_s": spec.idle_timeout,
        "max_lifetime_s": spec.max_lifetime,
        "warm_target": spec.warm_target,
        "simulated_gpu": pool.simulated_gpus,
    }
    # Paths and variable names only: the gateway reads the values at start (compliance.md).
    if spec.secrets:
        metadata["secrets"] = [secret.metadata() for secret in spec.secrets]
    if spec.audit.metadata():
        metadata["audit"] = spec.audit.metadata()
    return metadata


def render_local(spec: KernelSpec, config: PlatformConfig) -> Files:
    """kernel.json for EG's LocalProcessProxy, plus the spec folder's assets (logos...)."""
    kernel = {
        "argv": [str(local_python(spec, config)), *_LAUNCHER],
        "display_name": spec.display_name,
        "language": spec.language,
        "env": {},
        "metadata": {
            "process_proxy": {"class_name": LOCAL_PROCESS_PROXY},
            "kernelfleet": kernelfleet_metadata(spec, config),
        },
    }
    return {**_assets(spec), KERNEL_JSON: _json_bytes(kernel)}


def _render_kubernetes(spec: KernelSpec, config: PlatformConfig) -> Files:
    from .render_kubernetes import render_kubernetes  # its own module; imports this one

    return render_kubernetes(spec, config)


RENDERERS: dict[str, Renderer] = {"local": render_local, "kubernetes": _render_kubernetes}


def _assets(spec: KernelSpec) -> Files:
    """Files beside spec.yaml that belong in the EG kernelspec (logo-64x64.png, kernel.js)."""
    if spec.source is None:
        return {}
    folder = spec.source.parent
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
        and path.name not in (SPEC_FILE, KERNEL_JSON)
        and not any(
            part.startswith(".") or part == "__pycache__" for part in path.relative_to(folder).parts
        )
    }


def _json_bytes(data: Mapping[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()


# --- building ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildResult:
    """What a build did: where, which kernelspecs, whether any file changed."""

    output: Path
    names: tuple[str, ...]
    changed: bool
    warnings: tuple[Problem, ...]


def default_output(config: PlatformConfig, backend: str) -> Path:
    """``<state_dir>/kernelspecs/<backend>``, the folder EG's JUPYTER_PATH points at."""
    return config.state_dir / "kernelspecs" / backend


def renderer_for(backend: str) -> Renderer:
    """The renderer of a backend, or a KernelfleetError saying why there is none."""
    if backend in RENDERERS:
        return RENDERERS[backend]
    raise KernelfleetError(f"unknown backend '{backend}' (known: {', '.join(BACKENDS)})")


def build(config: PlatformConfig, *, backend: str, output: Path | None = None) -> BuildResult:
    """Check, render and write every kernelspec into ``<output>/kernels/<name>/``.

    Nothing is written unless every spec is valid (else InvalidKernelspecs). The output
    folder is replaced as a whole, so removed kernelspecs disappear; when the rendered
    files equal what is there, nothing is touched (``changed`` is False).
    """
    render = renderer_for(backend)
    output = Path(os.path.abspath(output or default_output(config, backend)))
    checked = check_kernelspecs(config)
    if checked.errors:
        raise InvalidKernelspecs(checked.problems)
    files: Files = {MARKER: _MARKER_TEXT}
    for name, spec in checked.specs.items():
        for relative, data in render(spec, config).items():
            files[f"kernels/{name}/{relative}"] = data
    changed = write_tree(output, files)
    return BuildResult(output, tuple(checked.specs), changed, tuple(checked.warnings))


def build_local(config: PlatformConfig, output: Path | None = None) -> Path:
    """Build the local backend's kernelspecs (for `kernelfleet up`); return the folder.

    Point EG's ``JUPYTER_PATH`` at the returned folder. Raises InvalidKernelspecs.
    """
    return build(config, backend="local", output=output).output


def write_tree(output: Path, files: Files) -> bool:
    """Make ``output`` hold exactly ``files``; return False if it already did.

    The files are written into a new folder beside ``output`` that then takes its place,
    so a failure at any point leaves the previous ``output`` as it was.
    """
    if _tree_equals(output, files):
        return False
    _refuse_foreign(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.new-", dir=output.parent))
    try:
        _write_files(staging, files)
        staging.chmod(0o755)  # mkdtemp makes it 0700; EG may run as another user
        _swap(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


def _write_files(folder: Path, files: Files) -> None:
    for relative, data in files.items():
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def _swap(new: Path, output: Path) -> None:
    """Put ``new`` at ``output``; the previous ``output`` comes back if that fails."""
    if not output.exists():
        new.rename(output)
        return
    old = new.with_name(new.name.replace(".new-", ".old-", 1))
    output.rename(old)
    try:
        new.rename(output)
    except BaseException:
        old.rename(output)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _tree_equals(output: Path, files: Files) -> bool:
    if not output.is_dir():
        return False
    present = {p.relative_to(output).as_posix(): p for p in output.rglob("*") if p.is_file()}
    return present.keys() == files.keys() and all(
        present[relative].read_bytes() == data for relative, data in files.items()
    )


def _refuse_foreign(output: Path) -> None:
    if not output.exists():
        return
    if output.is_dir() and (not any(output.iterdir()) or (output / MARKER).is_file()):
        return
    reason = "exists and was not written by `kernelfleet kernelspecs build`, which replaces"
    raise ConfigError(str(output), "", f"{reason} the whole folder; pick another --output")
