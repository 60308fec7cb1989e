"""Admin edits of the registry, each with its ledger record."""

from typing import Any

from django.db import transaction

from orchestration.ledger.chain import ledger_append
from orchestration.registry.declare import RISK_FIELDS
from orchestration.registry.models import Agent, Tool


def _jsonable(value: Any) -> Any:
    return str(value) if not isinstance(value, str | int | float | bool | list | None) else value


def tool_update_risk(*, tool: Tool, by, **changes: Any) -> Tool:
    """Change a tool's risk metadata. From then on a sync keeps the admin's values."""
    unknown = set(changes) - set(RISK_FIELDS)
    if unknown:
        raise ValueError(f"Not risk metadata: {', '.join(sorted(unknown))}")
    with transaction.atomic():
        locked = Tool.objects.select_for_update().get(pk=tool.pk)
        diff = {
            field: [_jsonable(getattr(locked, field)), _jsonable(value)]
            for field, value in changes.items()
            if getattr(locked, field) != value
        }
        if not diff:
            return locked
        for field, value in changes.items():
            setattr(locked, field, value)
        locked.risk_overridden = True
        locked.full_clean()
        locked.save()
        ledger_append(
            "tool.risk_changed",
            actor=by,
            tool=locked.name,
            object_type="tool",
            object_id=locked.name,
            payload={"tool": locked.name, "changes": diff},
        )
    return locked


def agent_record_change(*, agent: Agent, by, changed: dict[str, Any]) -> None:
    """Record an agent's configuration change (autonomy, status, budgets, tools) in the ledger,
    inside the caller's transaction."""
    if changed:
        verb = "agent.autonomy_changed" if set(changed) == {"autonomy"} else "agent.changed"
        ledger_append(
            verb,
            actor=by,
            agent_id=agent.pk,
            object_type="agent",
            object_id=agent.name,
            payload={"agent": agent.name, "changes": changed},
        )
