"""Totals a policy can see: what the same tool has done so far in the run, for the acting agent
over a day, and on the same target (the value of the tool's declared ``target`` argument, e.g.
one order) over all time, across runs and agents: "the order's refunds in total" has no window,
or waiting a month would reset it.

Each total is ``{"count": n, "sum": {argument: total}}`` over the tool's numeric top-level
arguments (doubles), counting the action being decided and the tool steps that executed or are
executing (started, retrying, completed), with the arguments that executed (an approved edit's,
else the proposed ones). Refused and waiting steps are not counted. So a limit reads as it is
meant: ``totals.target.sum.amount > 500.0`` is "with this refund, the order's refunds pass 500".

The agent is the one acting (the step's recorded agent; for older steps, the run's). Three
aggregate queries per decision, one per total: the run's through the (run, seq) unique index,
the agent's and the target's through the (name, started_at) index of steps (the target's by its
leading ``name`` column: its cost grows with the tool's whole history, one pass over that tool's
steps, which is what an all-time total is; an index on the target value is the next step if a
tool's history grows large)."""

from datetime import timedelta
from typing import Any

from django.db.models import CharField, Count, F, FloatField, Sum, Value
from django.db.models.fields.json import KT
from django.db.models.functions import Cast, Coalesce, Trim
from django.utils import timezone

from approvals.policy.cel import numeric_arguments
from orchestration.registry.declare import TOOLS
from orchestration.runs.models import Step, StepKind, StepStatus

AGENT_WINDOW = timedelta(hours=24)
EXECUTED = (StepStatus.STARTED, StepStatus.RETRYING, StepStatus.COMPLETED)


def _executed(name: str) -> KT:
    """An argument as it executed: the approval's arguments where there were any."""
    return Coalesce(KT(f"verdict__args__{name}"), KT(f"input__args__{name}"))


def _total(steps, fields: list[str], args: dict[str, Any]) -> dict[str, Any]:
    """The steps' total with the action's own arguments added."""
    sums = {
        f"sum_{i}": Coalesce(Sum(Cast(_executed(name), FloatField())), Value(0.0))
        for i, name in enumerate(fields)
    }
    row = steps.aggregate(count=Count("pk"), **sums) if steps is not None else {}
    return {
        "count": row.get("count", 0) + 1,
        "sum": {
            name: round(row.get(f"sum_{i}", 0.0) + _number(args.get(name)), 6)
            for i, name in enumerate(fields)
        },
    }


def _number(value: Any) -> float:
    return float(value) if type(value) in (int, float) else 0.0


def totals(
    *, tool: str, args: dict[str, Any], run_id: int, step_seq: int, agent: str
) -> dict[str, dict[str, Any]]:
    """The totals of ``tool`` for one decision (JSON-serialisable: stored with the input)."""
    definition = TOOLS.get(tool)
    fields = numeric_arguments(definition.schema) if definition else []
    target = definition.target if definition else ""
    value = args.get(target) if target else None
    now = timezone.now()
    executed = Step.objects.filter(kind=StepKind.TOOL, name=tool, status__in=EXECUTED).exclude(
        run_id=run_id, seq=step_seq
    )
    in_run = executed.filter(run_id=run_id)
    by_agent = (
        executed.filter(started_at__gte=now - AGENT_WINDOW)
        .annotate(
            acting=Coalesce(KT("input__agent"), F("run__agent__name"), output_field=CharField())
        )
        .filter(acting=agent)
    )
    on_target = executed.annotate(target_value=Trim(_executed(target))).filter(target_value=value)
    return {
        "run": _total(in_run, fields, args),
        "agent": _total(by_agent if agent else None, fields, args),
        "target": _total(on_target if isinstance(value, str) else None, fields, args),
    }
