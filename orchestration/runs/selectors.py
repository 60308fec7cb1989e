"""Reads for the run pages and their live fragments: the filtered list, and the timeline a
reviewer reads (events in order, each attached to its step, minus what is not theirs to read).
Who may see and act is ``orchestration.runs.access``'s to say."""

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.db.models import QuerySet

from orchestration.registry.declare import latest_workflows
from orchestration.registry.models import Agent
from orchestration.runs.models import Event, Run, RunStatus, Step, StepKind, StepStatus

PAGE_SIZE = 50


# --- the list -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFilters:
    status: str = ""
    agent: str = ""
    workflow: str = ""
    before: int | None = None  # keyset: runs with a smaller id (older pages)

    @classmethod
    def from_query(cls, query) -> "RunFilters":
        status = query.get("status", "")
        before = query.get("before", "")
        return cls(
            status=status if status in RunStatus.values else "",
            agent=query.get("agent", "")[:80],
            workflow=query.get("workflow", "")[:120],
            before=int(before) if before.isdigit() else None,
        )

    def querystring(self, *, page: bool = True) -> str:
        from django.utils.http import urlencode

        pairs = {"status": self.status, "agent": self.agent, "workflow": self.workflow}
        if page and self.before:
            pairs["before"] = str(self.before)
        return urlencode({k: v for k, v in pairs.items() if v})


def runs_filtered(filters: RunFilters) -> QuerySet[Run]:
    runs = Run.objects.select_related("agent", "started_by").order_by("-id")
    if filters.status:
        runs = runs.filter(status=filters.status)
    if filters.agent:
        runs = runs.filter(agent__name=filters.agent)
    if filters.workflow:
        runs = runs.filter(workflow=filters.workflow)
    return runs


def _row(run: Run) -> Run:
    run.cost_label = money(run.cost_usd)
    return run


def run_page(filters: RunFilters) -> tuple[list[Run], int | None]:
    """One page of runs, newest first, and the ``before`` of the next page (or None)."""
    runs = runs_filtered(filters)
    if filters.before:
        runs = runs.filter(pk__lt=filters.before)
    page = list(runs[: PAGE_SIZE + 1])
    more = len(page) > PAGE_SIZE
    page = [_row(run) for run in page[:PAGE_SIZE]]
    return page, (page[-1].pk if more else None)


def run_row(run_id: int, filters: RunFilters | None = None) -> Run | None:
    """The run as a list row, if it exists and matches ``filters``."""
    run = runs_filtered(filters or RunFilters()).filter(pk=run_id).first()
    return _row(run) if run else None


def filter_choices() -> dict[str, list[str]]:
    workflows = {w.name for w in latest_workflows()}
    workflows.update(
        Run.objects.exclude(workflow__startswith="_").values_list("workflow", flat=True).distinct()
    )
    return {
        "statuses": list(RunStatus.values),
        "agents": list(Agent.objects.order_by("name").values_list("name", flat=True)),
        "workflows": sorted(workflows),
    }


# --- one run ------------------------------------------------------------------------------


def run_get(run_id: int) -> Run | None:
    return Run.objects.select_related("agent", "started_by", "parent").filter(pk=run_id).first()


def run_children(run: Run) -> list[Run]:
    return list(run.children.select_related("agent").order_by("id"))


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def compact(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def money(value: Decimal | float | None) -> str:
    amount = Decimal(str(value or 0))
    if amount == 0:
        return "$0"
    if amount < Decimal("0.01"):
        return f"${amount:.6f}".rstrip("0")
    return f"${amount:.2f}"


def pairs(mapping: Any) -> list[tuple[str, str]]:
    """A mapping as (key, display value) rows: strings as they are, everything else as JSON."""
    if not isinstance(mapping, dict):
        return [("value", compact(mapping))] if mapping not in (None, {}) else []
    return [(str(key), compact(value)) for key, value in mapping.items()]


# Events whose content the step's card already shows in full.
SHOWN_IN_CARD = {
    "tool.started",
    "tool.completed",
    "llm.completed",
    "retrieve.completed",
    "check.passed",
    "check.failed",
}


@dataclass
class StepView:
    """One step as the timeline shows it. Fields that do not apply to the step's kind stay
    empty; the template shows what is there."""

    step: Step
    events: list[Event] = field(default_factory=list)
    reasoning: str = ""
    confidence: str = ""
    args: list[tuple[str, str]] = field(default_factory=list)
    result: str = ""  # pretty JSON
    model: str = ""
    messages: list[dict] = field(default_factory=list)
    response: str = ""
    parsed: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    query: str = ""
    snippets: list[dict] = field(default_factory=list)
    check: dict | None = None
    verdict: dict | None = None
    question: str = ""
    choices: list[str] = field(default_factory=list)
    answer: dict | None = None
    child: Run | None = None
    hidden_for: str = ""  # whom the step's content is for, when not for this viewer

    @property
    def kind_label(self) -> str:
        if self.step.kind not in StepKind.values:
            return "step"
        return str(StepKind(self.step.kind).label).lower()

    @property
    def notes(self) -> list[Event]:
        """The step's events that say more than the card shows: retries, failures, waits,
        answers, and a verdict that differs from the final one."""
        final = (self.verdict or {}).get("outcome")
        notes = []
        for event in self.events:
            if event.kind in SHOWN_IN_CARD:
                continue
            if event.kind.startswith("verdict.") and event.kind == f"verdict.{final}":
                continue
            notes.append(event)
        return notes

    @property
    def cost(self) -> str:
        return money(self.step.cost_usd)

    @property
    def failed(self) -> bool:
        return self.step.status == StepStatus.FAILED


@dataclass
class Entry:
    """A line of the timeline: a step (with its events) or an event of the run itself."""

    dom_id: str
    step: StepView | None = None
    event: Event | None = None


def _verdict(record: Any) -> dict | None:
    if not isinstance(record, dict) or not record.get("outcome"):
        return None
    return {
        "outcome": record["outcome"],
        "reason": record.get("reason") or "",
        "score": record.get("score"),
        "rules": [compact(r) for r in record.get("rules") or []],
        "policy_version": record.get("policy_version"),
        "diff": pretty(record["diff"]) if record.get("diff") else "",
    }


def step_view(step: Step, events: list[Event], children: dict[int, Run]) -> StepView:
    view = StepView(step=step, events=events, verdict=_verdict(step.verdict))
    data = step.input if isinstance(step.input, dict) else {}
    output = step.output
    if step.kind == StepKind.TOOL:
        view.reasoning = data.get("reasoning") or ""
        if isinstance(data.get("confidence"), int | float):
            view.confidence = f"{data['confidence']:.0%}"
        view.args = pairs(data.get("args") or {})
        if output is not None:
            view.result = pretty(output)
    elif step.kind == StepKind.LLM:
        view.model = " / ".join(str(data[k]) for k in ("provider", "model") if data.get(k))
        view.messages = [
            {
                "role": m.get("role", "?"),
                "content": compact(m.get("content", "")),
                "tool_calls": [c.get("name", "?") for c in m.get("tool_calls") or []],
            }
            for m in data.get("messages") or []
            if isinstance(m, dict)
        ]
        if isinstance(output, dict):
            view.response = output.get("text") or ""
            view.parsed = pretty(output["parsed"]) if output.get("parsed") is not None else ""
            view.tool_calls = [
                {
                    "name": c.get("name", "?"),
                    "args": pairs(c.get("arguments") or {}),
                    # the model's text often is the call's reasoning: say it once
                    "reasoning": "" if c.get("reasoning") == view.response else c.get("reasoning"),
                }
                for c in output.get("tool_calls") or []
            ]
    elif step.kind == StepKind.RETRIEVE:
        view.query = data.get("query") or ""
        view.snippets = [s for s in output or [] if isinstance(s, dict)]
    elif step.kind == StepKind.CHECK:
        if isinstance(output, dict):
            view.check = {"passed": bool(output.get("passed")), "detail": output.get("detail", "")}
        else:
            view.check = {"passed": None, "detail": data.get("detail", "")}
    elif step.kind == StepKind.ASK_HUMAN:
        view.question = data.get("question") or ""
        view.choices = [compact(c) for c in data.get("choices") or []]
        view.answer = output if isinstance(output, dict) else None
    elif step.kind == StepKind.HANDOFF:
        view.question = data.get("goal") or ""
        view.args = pairs(data.get("context") or {})
        view.child = children.get(step.seq)
        if output is not None:
            view.result = pretty(output)
    else:  # sleep, now, uuid, budget
        view.args = pairs(data)
        if output is not None:
            view.result = pretty(output)
    return view


def concealed(steps: Mapping[int, Step], hidden: Mapping[int, str]) -> dict[int, str]:
    """``hidden`` (step seq: whom it is for) and the model calls that carry what those steps
    carry: from the call that proposed the first hidden step (its tool calls hold the arguments
    and reasoning) on, as every later prompt repeats the conversation and the results."""
    if not hidden:
        return {}
    first = min(hidden)
    models = [seq for seq, step in steps.items() if step.kind == StepKind.LLM]
    proposer = max((seq for seq in models if seq < first), default=first)
    return {**{seq: hidden[first] for seq in models if seq >= proposer}, **hidden}


def run_timeline(run: Run, *, hidden: Mapping[int, str] | None = None) -> list[Entry]:
    """Events in order; a step sits where its first event is, with all its events attached.
    A step without events yet (a model call in flight, ``now``) sits before the next step that
    has one, or at its start time among the run's own events. Steps in ``hidden`` (from
    ``RunAccess.hidden_steps``) and the model calls that carry them show only that they
    happened: no input, output, verdict, error or events."""
    steps = {s.seq: s for s in run.step_set.all()}
    hidden = concealed(steps, hidden or {})
    children = {c.parent_step_seq: c for c in run.children.all() if c.parent_step_seq}
    by_step: dict[int, list[Event]] = {}
    order: list[tuple[str, int | Event]] = []
    for event in run.events.all():
        seq = event.step_seq
        if seq is None or seq not in steps:
            order.append(("event", event))
            continue
        if seq not in by_step:
            by_step[seq] = []
            order.append(("step", seq))
        by_step[seq].append(event)
    for seq in sorted(set(steps) - set(by_step)):
        order.insert(_slot(order, seq, steps[seq]), ("step", seq))
    entries = []
    for kind, item in order:
        if kind == "event":
            entries.append(Entry(dom_id=f"event-{item.pk}", event=item))
        elif item in hidden:
            view = StepView(step=steps[item], hidden_for=hidden[item])
            entries.append(Entry(dom_id=f"step-{item}", step=view))
        else:
            view = step_view(steps[item], by_step.get(item, []), children)
            entries.append(Entry(dom_id=f"step-{item}", step=view))
    return entries


def _slot(order: list[tuple[str, Any]], seq: int, step: Step) -> int:
    for index, (kind, item) in enumerate(order):
        if kind == "step" and item > seq:
            return index
    for index, (kind, item) in enumerate(order):
        if kind == "event" and step.started_at and item.at > step.started_at:
            return index
    return len(order)


def run_facts(run: Run, *, withheld: str = "") -> dict[str, Any]:
    """The header's derived values. ``withheld`` (whom a hidden step is for): the run's result
    and error may carry that step's output, so the viewer is told whose they are instead."""
    intent = run.intent if isinstance(run.intent, dict) else {}
    return {
        "withheld": withheld,
        "cost": money(run.cost_usd),
        "percent": round((run.progress or 0) * 100),
        "goal": intent.get("goal") or "",
        "constraints": [compact(c) for c in intent.get("constraints") or []],
        "boundaries": [compact(b) for b in intent.get("boundaries") or []],
        "input": pairs(run.input or {}),
        "result": pretty(run.result) if run.result is not None and not withheld else "",
        "children": run_children(run),
    }
