"""The effective quota of a user: which limits apply when they start a kernel.

kernelfleet.yaml has ``quotas.default``, ``quotas.groups.<group>`` and
``quotas.users.<user>``, each a :class:`~kernelfleet.config.Quota` with the fields
``kernels``, ``cpus``, ``memory``, ``gpus`` and ``gpu_hours_per_day``. ``None`` (or
``null`` in YAML) means unlimited.
"""

from __future__ import annotations

from collections.abc import Iterable

from kernelfleet.config import Quota, Quotas

QUOTA_FIELDS: tuple[str, ...] = tuple(Quota.model_fields)


def _more_generous(a: float | None, b: float | None) -> float | None:
    """The larger limit; ``None`` (unlimited) beats any number."""
    if a is None or b is None:
        return None
    return max(a, b)


def _group_value(field: str, group_quotas: list[Quota]) -> tuple[bool, float | None]:
    """Whether any group sets ``field``, and the most generous value among those that do."""
    values = [getattr(q, field) for q in group_quotas if field in q.model_fields_set]
    if not values:
        return False, None
    best = values[0]
    for value in values[1:]:
        best = _more_generous(best, value)
    return True, best


def effective_quota(quotas: Quotas, user: str, groups: Iterable[str]) -> Quota:
    """The limits that apply to ``user`` (a member of ``groups``), decided field by field.

    For each field (kernels, cpus, memory, gpus, gpu_hours_per_day):

    1. the user's own entry in ``quotas.users`` wins if it sets the field (writing
       ``null`` there explicitly makes it unlimited for that user);
    2. else, among the user's groups that have an entry in ``quotas.groups`` and set the
       field, the most generous value applies (unlimited beats any number, otherwise the
       largest) - even when it is below the default, so a group can also lower a limit;
       joining one more group never lowers a limit that the user's other groups set;
    3. else ``quotas.default`` applies (its unset fields are unlimited).

    "Sets the field" means the field is written in kernelfleet.yaml, so ``groups: {ml:
    {gpus: 1}}`` raises only the GPU limit of ml members and keeps the default kernels.
    """
    override = quotas.users.get(user)
    group_quotas = [quotas.groups[g] for g in sorted(set(groups)) if g in quotas.groups]
    resolved: dict[str, float | None] = {}
    for field in QUOTA_FIELDS:
        if override is not None and field in override.model_fields_set:
            resolved[field] = getattr(override, field)
            continue
        found, value = _group_value(field, group_quotas)
        resolved[field] = value if found else getattr(quotas.default, field)
    return Quota.model_validate(resolved)
