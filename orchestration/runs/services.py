"""Starting, halting, retrying and resuming runs. Each write is one transaction with its ledger
record; the worker is told after commit."""

from typing import Any

import jsonschema
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.utils import timezone

from orchestration.canonical import CanonicalError, canonical_json
from orchestration.engine.dispatch import enqueue_on_commit
from orchestration.gate import get_gate
from orchestration.ledger.chain import ledger_append
from orchestration.registry.declare import get_workflow
from orchestration.registry.models import Agent, AgentStatus
from orchestration.runs.access import run_access
from orchestration.runs.models import FINAL, Event, Run, RunStatus, Step, StepStatus
from orchestration.runs.realtime import broadcast_run

DEFAULT_BUDGETS = {
    "max_steps": 200,
    "max_tokens": 500_000,
    "max_cost_usd": 10.0,
    "max_wall_seconds": 24 * 3600,
    "loop_limit": 3,
}


class RunError(ValidationError):
    """A run that cannot be started or changed; the message says why."""


def _input_errors(schema: dict, data: Any) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{'/'.join(str(p) for p in error.absolute_path) or 'input'}: {error.message}"
        for error in sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    ]


def run_start(
    *,
    workflow: str,
    input: dict[str, Any],
    agent: Agent | str | None = None,
    intent: dict[str, Any] | None = None,
    started_by=None,
    version: int | None = None,
) -> Run:
    """Validate the input against the workflow's schema and start a run, pinned to a version."""
    definition = get_workflow(workflow, version)
    errors = _input_errors(definition.input_schema, input)
    if errors:
        raise RunError(errors)
    try:
        canonical_json(input, path="input")
    except CanonicalError as exc:
        raise RunError(str(exc)) from exc
    if isinstance(agent, str):
        agent = Agent.objects.filter(name=agent).first() or _missing_agent(agent)
    if agent is not None and agent.status != AgentStatus.ACTIVE:
        raise RunError(f"Agent {agent.name} is {agent.status}; it cannot start runs.")
    intent = {"goal": "", "constraints": [], "boundaries": [], **(intent or {})}
    with transaction.atomic():
        run = Run.objects.create(
            workflow=definition.name,
            workflow_version=definition.version,
            agent=agent,
            input=input,
            intent=intent,
            budgets=agent.budgets() if agent else dict(DEFAULT_BUDGETS),
            started_by=started_by if getattr(started_by, "is_authenticated", False) else None,
        )
        Event.objects.create(
            run=run,
            kind="run.created",
            message=f"Run of {definition.name} v{definition.version} created"
            + (f" for {agent.name}" if agent else "")
            + (f": {intent['goal']}" if intent.get("goal") else "."),
        )
        ledger_append(
            "run.created",
            actor=started_by or "system",
            run_id=run.pk,
            agent_id=agent.pk if agent else None,
            workflow=definition.name,
            outcome="created",
            payload={"workflow": definition.name, "version": definition.version, "input": input},
        )
        enqueue_on_commit(run.pk)
        transaction.on_commit(lambda: broadcast_run(run.pk))
    return run


def _missing_agent(name: str):
    raise RunError(f"No agent named {name!r}.")


def _within_transaction() -> None:
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("This runs inside the caller's transaction.")


def run_halt(*, run: Run | int, by, reason: str) -> Run:
    """Halt a run, in a transaction of its own (an entry point: a view, a command). Once it
    commits no step starts; open waits are cancelled through the gate, and so are the run's
    children."""
    run_id = run if isinstance(run, int) else run.pk
    with transaction.atomic(durable=True):
        halt_within_transaction(run_id=run_id, by=by, reason=reason)
    return Run.objects.get(pk=run_id)


def halt_within_transaction(*, run_id: int, by, reason: str) -> None:
    """``run_halt`` inside the caller's transaction, whose commit it becomes part of (a
    reviewer's decision that halts the run with its request). Locks the run first."""
    _within_transaction()
    reason = (reason or "").strip()
    if not reason:
        raise RunError("A reason is required to halt a run.")
    label = by.get_username() if hasattr(by, "get_username") else str(by)
    with transaction.atomic():  # a savepoint: a refusal leaves the caller's transaction whole
        locked = Run.objects.select_for_update().get(pk=run_id)
        if locked.status in FINAL:
            raise RunError(f"Run {run_id} is already {locked.status}.")
        refusal = run_access().halt_refusal(by, locked) if hasattr(by, "has_perm") else ""
        if refusal:  # a person (not a deadline) may not close another team's open request
            raise PermissionDenied(refusal)
        Run.objects.filter(pk=run_id).update(
            status=RunStatus.HALTED,
            halted_by=label,
            halt_reason=reason,
            finished_at=timezone.now(),
            lease_owner="",
            lease_expires_at=None,
            wake_at=None,
        )
        Step.objects.filter(
            run_id=run_id, status__in=[StepStatus.WAITING, StepStatus.RETRYING]
        ).update(
            status=StepStatus.FAILED, error=f"halted by {label}: {reason}", error_type="Halted"
        )
        Event.objects.create(
            run_id=run_id, kind="run.halted", message=f"Halted by {label}: {reason}"
        )
        ledger_append(
            "run.halted",
            actor=by,
            run_id=run_id,
            agent_id=locked.agent_id,
            workflow=locked.workflow,
            outcome="halted",
            reason=reason,
            payload={"reason": reason},
        )
        get_gate().cancel_run(run_id, by=label, reason=reason)
        for child_id in (
            Run.objects.filter(parent_id=run_id)
            .exclude(status__in=FINAL)
            .values_list("pk", flat=True)
        ):
            halt_within_transaction(
                run_id=child_id, by=by, reason=f"parent run {run_id} halted: {reason}"
            )
        transaction.on_commit(lambda: broadcast_run(run_id))


def run_retry(*, run: Run | int, by) -> Run:
    """Retry a failed run from its failed step, keeping its history (steps and events)."""
    run_id = run if isinstance(run, int) else run.pk
    with transaction.atomic(durable=True):
        locked = Run.objects.select_for_update().get(pk=run_id)
        if locked.status != RunStatus.FAILED:
            raise RunError(f"Only failed runs can be retried; run {run_id} is {locked.status}.")
        failed = (
            Step.objects.filter(run_id=run_id, status=StepStatus.FAILED).order_by("-seq").first()
        )
        if failed is not None:
            Step.objects.filter(pk=failed.pk).update(
                status=StepStatus.RETRYING, next_attempt_at=timezone.now()
            )
        Run.objects.filter(pk=run_id).update(
            status=RunStatus.PENDING, error="", finished_at=None, wake_at=None
        )
        where = f"from step {failed.seq} ({failed.name})" if failed else "from the start"
        label = by.get_username() if hasattr(by, "get_username") else str(by)
        Event.objects.create(
            run_id=run_id, kind="run.retried", message=f"Retried {where} by {label}."
        )
        ledger_append(
            "run.retried",
            actor=by,
            run_id=run_id,
            agent_id=locked.agent_id,
            workflow=locked.workflow,
            outcome="retried",
            payload={
                "from_step": failed.seq if failed else None,
                "previous_error": locked.error[:2000],
            },
        )
        enqueue_on_commit(run_id)
        transaction.on_commit(lambda: broadcast_run(run_id))
    return Run.objects.get(pk=run_id)


def run_resume(*, run_id: int, note: str = "") -> None:
    """Something the run waits for has happened: advance it now, in a transaction of its own
    (an entry point)."""
    with transaction.atomic(durable=True):
        resume_within_transaction(run_id=run_id, note=note)


def resume_within_transaction(*, run_id: int, note: str = "") -> None:
    """``run_resume`` inside the caller's transaction (a decision, an answer, an expiry): the
    worker is told once that commits.

    The run is also marked due (``wake_at``): a worker that still holds its lease, about to
    suspend it, sees the mark and enqueues it again, and beat's sweep catches it should that
    message be lost; otherwise the decision could land between a worker opening the request
    and suspending the run, and nothing would wake it."""
    _within_transaction()
    Run.objects.filter(pk=run_id).exclude(status__in=FINAL).update(wake_at=timezone.now())
    if note:
        Event.objects.create(run_id=run_id, kind="run.resumed", message=note)
    enqueue_on_commit(run_id)
