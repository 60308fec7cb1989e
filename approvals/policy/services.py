"""Publishing the draft, and grants. Each write is one transaction with its ledger record."""

import difflib
import json
from datetime import datetime
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from approvals.access import check_grant
from approvals.policy.cel import CONTEXT_FIELDS, ConditionError, validate_condition
from approvals.policy.compiled import matches
from approvals.policy.models import ArgumentFactor, AutonomyThreshold, Grant, PolicyVersion, Rule
from approvals.queue.models import ApprovalRequest
from orchestration.ledger.chain import ledger_append
from orchestration.registry.declare import POLICY_RISK_FIELDS, TOOLS
from orchestration.registry.models import Agent, Tool


def args_schemas(tool_patterns: list[str]) -> list[dict]:
    """The argument schemas of the declared tools a scope covers."""
    return [d.schema for name, d in sorted(TOOLS.items()) if matches(tuple(tool_patterns), name)]


def condition_check(condition: str, *, tool_patterns: list[str]) -> None:
    """Refuse a condition that uses a field that does not exist, or that fails on samples."""
    validate_condition(condition, context=CONTEXT_FIELDS, args_schemas=args_schemas(tool_patterns))


def draft_snapshot() -> dict[str, Any]:
    return {
        "rules": [
            {
                "id": rule.pk,
                "name": rule.name,
                "enabled": rule.enabled,
                "mode": rule.mode,
                "priority": rule.priority,
                "agents": rule.agents,
                "workflows": rule.workflows,
                "tool_patterns": rule.tool_patterns,
                "condition": rule.condition,
                "outcome": rule.outcome,
                "obligations": {
                    "team": rule.team,
                    "quorum": rule.quorum,
                    "deadline_minutes": rule.deadline_minutes,
                    "on_expiry": rule.on_expiry,
                    "escalation_team": rule.escalation_team,
                    "message": rule.message,
                    "allow_similar": rule.allow_similar,
                },
            }
            for rule in Rule.objects.all()
        ],
        "factors": [
            {
                "name": f.name,
                "tool_patterns": f.tool_patterns,
                "condition": f.condition,
                "points": f.points,
                "enabled": f.enabled,
            }
            for f in ArgumentFactor.objects.all()
        ],
        "thresholds": {
            t.autonomy: {
                "allow_below": t.allow_below,
                "deny_above": t.deny_above,
                "quorum2_above": t.quorum2_above,
            }
            for t in AutonomyThreshold.objects.all()
        },
        "tools": {t.pop("name"): t for t in Tool.objects.values("name", *POLICY_RISK_FIELDS)},
    }


def snapshot_diff(before: dict[str, Any], after: dict[str, Any]) -> str:
    """A readable unified diff of two snapshots (one line per rule, factor, threshold, tool)."""

    def lines(snapshot: dict[str, Any]) -> list[str]:
        out = []
        for rule in sorted(snapshot.get("rules", []), key=lambda r: r["name"]):
            body = {k: v for k, v in rule.items() if k not in ("id", "name")}
            out.append(f"rule {rule['name']}: {json.dumps(body, sort_keys=True)}")
        for factor in sorted(snapshot.get("factors", []), key=lambda f: f["name"]):
            out.append(f"factor {factor['name']}: {json.dumps(factor, sort_keys=True)}")
        for autonomy, values in sorted(snapshot.get("thresholds", {}).items()):
            out.append(f"thresholds {autonomy}: {json.dumps(values, sort_keys=True)}")
        for tool, values in sorted(snapshot.get("tools", {}).items()):
            out.append(f"tool {tool}: {json.dumps(values, sort_keys=True)}")
        return out

    diff = difflib.unified_diff(lines(before), lines(after), "published", "draft", lineterm="", n=0)
    return "\n".join(line for line in diff if not line.startswith("@@"))


def draft_problems(snapshot: dict[str, Any]) -> dict[str, str]:
    """The conditions of a snapshot that cannot be published, by rule or factor."""
    problems = {}
    for kind, items in (
        ("rule", snapshot.get("rules", [])),
        ("factor", snapshot.get("factors", [])),
    ):
        for item in items:
            try:
                condition_check(item["condition"], tool_patterns=item.get("tool_patterns") or [])
            except ConditionError as exc:
                problems[f"{kind} {item['name']}"] = str(exc)
    return problems


def policy_publish(*, by, note: str = "") -> PolicyVersion:
    """Freeze the draft into immutable version N+1, with a readable diff and a ledger record.
    Every condition is validated again first: nothing that fails validation is published."""
    snapshot = draft_snapshot()
    problems = draft_problems(snapshot)
    if problems:
        raise ValidationError(problems)
    with transaction.atomic():
        latest = PolicyVersion.objects.select_for_update().order_by("-number").first()
        number = (latest.number if latest else 0) + 1
        diff = snapshot_diff(latest.snapshot if latest else {}, snapshot)
        if latest and not diff:
            raise ValidationError("The draft is the same as the published policy.")
        version = PolicyVersion.objects.create(
            number=number,
            snapshot=snapshot,
            diff=diff,
            note=note,
            published_by=by if getattr(by, "is_authenticated", False) else None,
        )
        ledger_append(
            "policy.published",
            actor=by,
            object_type="policy",
            object_id=number,
            payload={"version": number, "note": note, "diff": diff[:20000]},
        )
    return version


def grant_create(
    *,
    agent: Agent,
    tool_pattern: str,
    by,
    condition: str = "",
    expires_at: datetime | None = None,
    run_id: int | None = None,
    max_uses: int | None = None,
    source: str = "admin",
    request: ApprovalRequest | None = None,
) -> Grant:
    if condition:
        try:
            condition_check(condition, tool_patterns=[tool_pattern])
        except ConditionError as exc:
            raise ValidationError({"condition": str(exc)}) from exc
    with transaction.atomic():
        grant = Grant.objects.create(
            agent=agent,
            tool_pattern=tool_pattern,
            condition=condition,
            expires_at=expires_at,
            run_id=run_id,
            max_uses=max_uses,
            source=source,
            request=request,
            created_by=by if getattr(by, "is_authenticated", False) else None,
        )
        ledger_append(
            "grant.created",
            actor=by,
            agent_id=agent.pk,
            tool=tool_pattern,
            object_type="grant",
            object_id=grant.pk,
            run_id=run_id,
            payload={
                "agent": agent.name,
                "tool_pattern": tool_pattern,
                "condition": condition,
                "source": source,
                "expires_at": expires_at.isoformat() if expires_at else None,
                "max_uses": max_uses,
                "request_id": request.pk if request else None,
            },
        )
    return grant


def grant_revoke(*, grant: Grant, by) -> Grant:
    """Revoke ``grant``. A person may revoke only the grants ``approvals.access`` shows them:
    a reviewer's "allow similar" belongs to the team of the request it was made on."""
    if hasattr(by, "has_perm"):
        check_grant(grant, by)
    label = by.get_username() if hasattr(by, "get_username") else str(by)
    with transaction.atomic():
        updated = Grant.objects.filter(pk=grant.pk, revoked_at__isnull=True).update(
            revoked_at=timezone.now(), revoked_by=label
        )
        if not updated:
            raise ValidationError("This grant is already revoked.")
        ledger_append(
            "grant.revoked",
            actor=by,
            agent_id=grant.agent_id,
            tool=grant.tool_pattern,
            object_type="grant",
            object_id=grant.pk,
            payload={"tool_pattern": grant.tool_pattern},
        )
    grant.refresh_from_db()
    return grant
