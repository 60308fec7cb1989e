"""Reviewers' "approve and allow similar": a grant (``source="reviewer"``) scoped to a run or an
hour, constrained to the approved arguments, to the data the approved action touched and to its
risk, with a use count. A grant alone never turns an ask into an allow (grants are least
privilege); the gate consults these grants only for an ask, never for an action whose risk is
above the deny threshold of the acting agent's autonomy, and each use is counted and recorded."""

import json
import re
from fnmatch import fnmatchcase
from typing import Any

from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from approvals.policy.cel import EvaluationError, compile_condition, evaluate
from approvals.policy.compiled import current_policy
from approvals.policy.decide import DEFAULT_THRESHOLDS, Decision, _cel_context
from approvals.policy.models import Grant
from orchestration.ledger.chain import ledger_append
from orchestration.runs.models import Run

REVIEWER = "reviewer"
# Free text is not a constraint: a similar action says something else.
FREE_TEXT = {"body", "reason", "subject", "message", "note", "comment", "text", "description"}
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
CEL_RESERVED = {
    "true", "false", "null", "in", "as", "break", "const", "continue", "else", "for",
    "function", "if", "import", "let", "loop", "package", "namespace", "return", "var",
    "void", "while",
}  # fmt: skip


def _field(name: str, within: str = "args") -> str:
    if IDENTIFIER.match(name) and name not in CEL_RESERVED:
        return f"{within}.{name}"
    return f"{within}[{json.dumps(name, ensure_ascii=False)}]"


def similar_condition(
    args: dict[str, Any],
    *,
    labels: list[str],
    score: int,
    totals: dict[str, Any] | None = None,
    data_subjects: list[str] | None = None,
) -> str:
    """A CEL constraint from an approved action: each top-level scalar argument except free text
    (strings and booleans equal, numbers at most the approved value); each summed total of the
    approved action (``totals``, e.g. the order's refunds with it) at most its approved value,
    so a grant never covers an action that takes a total past what the reviewer approved; the
    labels the action carries and the run has touched within the approved action's ``labels``;
    whose personal data the run has read within the approved action's ``data_subjects`` (a
    grant for Dana's data never sends Fatima's); the risk at most its ``score``."""
    clauses = []
    for name in sorted(args):
        value = args[name]
        if name in FREE_TEXT or value is None:
            continue
        if isinstance(value, bool):
            clauses.append(f"{_field(name)} == {'true' if value else 'false'}")
        elif isinstance(value, int | float):
            clauses.append(f"{_field(name)} <= {float(value)!r}")
        elif isinstance(value, str):
            clauses.append(f"{_field(name)} == {json.dumps(value, ensure_ascii=False)}")
    for scope in sorted(totals or {}):
        sums = (totals[scope] or {}).get("sum") or {}
        for name in sorted(sums):
            if type(sums[name]) in (int, float):
                total = _field(name, f"totals.{scope}.sum")
                clauses.append(f"{total} <= {float(sums[name])!r}")
    known = json.dumps(sorted(set(labels)), ensure_ascii=False)
    clauses.append(f"action.labels.all(label, label in {known})")
    clauses.append(f"run.labels.all(label, label in {known})")
    if data_subjects is not None:
        whose = json.dumps(sorted(set(data_subjects)), ensure_ascii=False)
        clauses.append(f"run.data_subjects.all(subject, subject in {whose})")
    clauses.append(f"risk.score <= {int(score)}")
    return " && ".join(clauses)


def _active(agent_id: int, run: Run):
    now = timezone.now()
    return (
        Grant.objects.filter(agent_id=agent_id, source=REVIEWER, revoked_at__isnull=True)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        .filter(Q(run_id__isnull=True) | Q(run_id=run.pk))
        .order_by("id")
    )


def similar_grant(decision: Decision, run: Run) -> Grant | None:
    """The first active reviewer grant of the agent acting that covers the decided action."""
    if decision.agent_id is None or decision.score > _deny_above(decision):
        return None
    tool = decision.input["action"]["tool"]
    ctx = None
    for grant in _active(decision.agent_id, run):
        if not fnmatchcase(tool, grant.tool_pattern):
            continue
        if grant.max_uses is not None and grant.uses >= grant.max_uses:
            continue
        if grant.condition:
            ctx = ctx or _cel_context(decision.input)
            try:
                if not evaluate(compile_condition(grant.condition), ctx):
                    continue
            except (EvaluationError, ValueError):
                continue  # a grant that cannot be checked grants nothing
        return grant
    return None


def _deny_above(decision: Decision) -> int:
    autonomy = decision.input["agent"]["autonomy"]
    thresholds = {**DEFAULT_THRESHOLDS, **current_policy().thresholds.get(autonomy, {})}
    return thresholds["deny_above"]


def similar_use(decision: Decision, run: Run, *, step_seq: int) -> Grant | None:
    """Use a covering reviewer grant: count the use and record it, in one transaction. None if
    no grant covers the action (or its last use was taken meanwhile)."""
    grant = similar_grant(decision, run)
    if grant is None:
        return None
    with transaction.atomic():
        used = Grant.objects.filter(pk=grant.pk, revoked_at__isnull=True)
        if grant.max_uses is not None:
            used = used.filter(uses__lt=grant.max_uses)
        if not used.update(uses=F("uses") + 1):
            return None
        grant.refresh_from_db()
        ledger_append(
            "grant.used",
            actor="policy-gate",
            run_id=run.pk,
            agent_id=decision.agent_id,
            workflow=run.workflow,
            tool=decision.input["action"]["tool"],
            outcome="allow",
            risk=decision.score,
            object_type="grant",
            object_id=grant.pk,
            payload={
                "tool": decision.input["action"]["tool"],
                "action_hash": decision.action_hash,
                "step_seq": step_seq,
                "uses": grant.uses,
                "max_uses": grant.max_uses,
            },
        )
    return grant


def grant_label(grant: Grant) -> str:
    who = grant.created_by.get_username() if grant.created_by else "a reviewer"
    return f"allowed similar by {who} (grant #{grant.pk})"
