"""A handoff's child run: created once per (parent, step), with the tools the caller may hand
on, and enqueued after commit."""

from collections.abc import Collection

from django.db import transaction

from orchestration.engine.dispatch import enqueue_on_commit
from orchestration.engine.errors import Halted
from orchestration.ledger.chain import ledger_append
from orchestration.registry.models import Agent
from orchestration.runs.models import Event, Run, RunStatus


def run_start_child(
    *,
    parent: Run,
    step_seq: int,
    agent: Agent,
    goal: str,
    context: dict,
    caller_tools: Collection[str],
) -> Run:
    """The child run of a handoff, created once per (parent, step). Its usable tools are the
    intersection of the caller's (what the parent may use where it hands off) and the
    callee's ceiling. Raises ``Halted`` if the parent was halted meanwhile."""
    existing = Run.objects.filter(parent=parent, parent_step_seq=step_seq).first()
    if existing is not None:
        return existing
    callee_tools = set(agent.tools.values_list("name", flat=True))
    with transaction.atomic():
        # The parent's row first: a child is created before a halt of the parent (whose
        # cascade then halts it) or not at all.
        locked = Run.objects.select_for_update().get(pk=parent.pk)
        if locked.status == RunStatus.HALTED:
            raise Halted(locked.halt_reason)
        child = Run.objects.create(
            workflow="_agent.task",
            workflow_version=1,
            agent=agent,
            input={"goal": goal, "context": context},
            intent={**parent.intent, "goal": goal},
            budgets=agent.budgets(),
            allowed_tools=sorted(set(caller_tools) & callee_tools),
            parent=parent,
            parent_step_seq=step_seq,
            started_by=parent.started_by,
        )
        Event.objects.create(
            run=child, kind="run.created", message=f"Handed off from run {parent.pk}: {goal}"
        )
        ledger_append(
            "run.created",
            actor="engine",
            run_id=child.pk,
            agent_id=agent.pk,
            workflow="_agent.task",
            outcome="created",
            payload={"workflow": "_agent.task", "parent": parent.pk},
        )
        enqueue_on_commit(child.pk)
    return child
