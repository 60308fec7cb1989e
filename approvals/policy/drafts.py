"""Editing the policy draft (rules, argument factors, thresholds) and agents' autonomy and status.

Each write is one transaction with its ledger record. The draft is not what the gate evaluates:
nothing here changes the published policy until ``policy_publish``."""

from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction

from approvals.policy.cel import ConditionError
from approvals.policy.models import ArgumentFactor, AutonomyThreshold, Rule
from approvals.policy.services import condition_check
from orchestration.ledger.chain import ledger_append
from orchestration.registry.models import Agent, Autonomy
from orchestration.registry.services import agent_record_change

RULE_FIELDS = (
    "name",
    "description",
    "enabled",
    "mode",
    "priority",
    "agents",
    "workflows",
    "tool_patterns",
    "condition",
    "outcome",
    "team",
    "quorum",
    "deadline_minutes",
    "on_expiry",
    "escalation_team",
    "message",
    "allow_similar",
)
FACTOR_FIELDS = ("name", "tool_patterns", "condition", "points", "enabled")
THRESHOLD_FIELDS = ("allow_below", "quorum2_above", "deny_above")


def _checked(obj) -> None:
    try:
        condition_check(obj.condition, tool_patterns=list(obj.tool_patterns or []))
    except ConditionError as exc:
        raise ValidationError({"condition": str(exc)}) from exc


def _save(model, fields, obj, data: dict[str, Any], *, kind: str, by):
    """Create or update ``obj`` from ``data``; the ledger record carries what changed."""
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"Not a field of a {kind}: {', '.join(sorted(unknown))}")
    with transaction.atomic():
        if obj is None:
            locked, before = model(), None
        else:
            # Re-read: a bound ModelForm has already written its data into the caller's object.
            locked = model.objects.select_for_update().get(pk=obj.pk)
            before = {f: getattr(locked, f) for f in fields}
        for field, value in data.items():
            setattr(locked, field, value)
        locked.full_clean()
        _checked(locked)
        after = {f: getattr(locked, f) for f in fields}
        changes = {
            f: [before[f] if before else None, after[f]]
            for f in fields
            if before is None or before[f] != after[f]
        }
        if before is not None and not changes:
            return locked
        locked.save()
        ledger_append(
            "policy.draft_changed",
            actor=by,
            object_type=kind,
            object_id=locked.pk,
            payload={
                "kind": kind,
                "name": locked.name,
                "change": "created" if before is None else "updated",
                "changes": changes,
            },
        )
    return locked


def _delete(obj, *, kind: str, by) -> None:
    with transaction.atomic():
        deleted, _ = type(obj).objects.filter(pk=obj.pk).delete()
        if not deleted:
            raise ValidationError(f"This {kind} was already deleted.")
        ledger_append(
            "policy.draft_changed",
            actor=by,
            object_type=kind,
            object_id=obj.pk,
            payload={"kind": kind, "name": obj.name, "change": "deleted"},
        )


def rule_save(*, rule_or_none: Rule | None, data: dict[str, Any], by) -> Rule:
    """Create a rule (``rule_or_none=None``) or change one in the draft. The condition is checked
    against the context and the argument schemas of the tools in scope; a bad one raises
    ``ValidationError`` and nothing is saved."""
    return _save(Rule, RULE_FIELDS, rule_or_none, data, kind="rule", by=by)


def rule_delete(*, rule: Rule, by) -> None:
    _delete(rule, kind="rule", by=by)


def factor_save(*, factor_or_none: ArgumentFactor | None, data: dict[str, Any], by):
    return _save(ArgumentFactor, FACTOR_FIELDS, factor_or_none, data, kind="factor", by=by)


def factor_delete(*, factor: ArgumentFactor, by) -> None:
    _delete(factor, kind="factor", by=by)


def thresholds_check(values: dict[str, dict[str, int]]) -> dict[str, str]:
    """Per-field problems, keyed ``"<autonomy>-<field>"``: each value within 0..100 and
    allow below <= quorum 2 above <= deny above."""
    problems: dict[str, str] = {}
    for autonomy, row in values.items():
        out_of_range = [
            field
            for field in THRESHOLD_FIELDS
            if not isinstance(row.get(field), int) or not 0 <= row[field] <= 100
        ]
        for field in out_of_range:
            problems[f"{autonomy}-{field}"] = "Must be a whole number from 0 to 100."
        if out_of_range:
            continue
        a, q, d = row["allow_below"], row["quorum2_above"], row["deny_above"]
        if a > q:
            problems[f"{autonomy}-allow_below"] = (
                f"Must not be above “quorum 2 above” ({q}): allow below ≤ quorum 2 above."
            )
        if q > d:
            problems[f"{autonomy}-quorum2_above"] = (
                f"Must not be above “deny above” ({d}): quorum 2 above ≤ deny above."
            )
    return problems


def thresholds_save(*, values: dict[str, dict[str, int]], by) -> list[AutonomyThreshold]:
    """Set the thresholds of the autonomy levels in ``values`` (supervised, guarded, trusted)."""
    unknown = set(values) - set(Autonomy.values)
    if unknown:
        raise ValidationError(f"Unknown autonomy level: {', '.join(sorted(unknown))}")
    problems = thresholds_check(values)
    if problems:
        raise ValidationError(problems)
    saved, changes = [], {}
    with transaction.atomic():
        existing = {t.autonomy: t for t in AutonomyThreshold.objects.select_for_update()}
        for autonomy, row in values.items():
            threshold = existing.get(autonomy) or AutonomyThreshold(autonomy=autonomy)
            before = {f: getattr(threshold, f, None) for f in THRESHOLD_FIELDS}
            after = {f: row[f] for f in THRESHOLD_FIELDS}
            if threshold.pk and before == after:
                saved.append(threshold)
                continue
            for field, value in after.items():
                setattr(threshold, field, value)
            threshold.full_clean()
            threshold.save()
            saved.append(threshold)
            changes[autonomy] = {
                f: [before[f], after[f]] for f in THRESHOLD_FIELDS if before[f] != after[f]
            }
        if changes:
            ledger_append(
                "policy.draft_changed",
                actor=by,
                object_type="thresholds",
                object_id=",".join(sorted(changes)),
                payload={"kind": "thresholds", "change": "updated", "changes": changes},
            )
    return saved


AGENT_FIELDS = ("autonomy", "status")


def agent_update(*, agent: Agent, by, **changes: Any) -> Agent:
    """Change an agent's autonomy or status, with its ledger record (``agent.autonomy_changed``
    when only the autonomy changes). Takes effect at the agent's next decision."""
    unknown = set(changes) - set(AGENT_FIELDS)
    if unknown:
        raise ValueError(f"Not editable here: {', '.join(sorted(unknown))}")
    with transaction.atomic():
        locked = Agent.objects.select_for_update().get(pk=agent.pk)
        changed = {f: str(v) for f, v in changes.items() if getattr(locked, f) != v}
        if not changed:
            return locked
        for field, value in changes.items():
            setattr(locked, field, value)
        locked.full_clean()
        locked.save(update_fields=list(changed))
        agent_record_change(agent=locked, by=by, changed=changed)
    return locked
