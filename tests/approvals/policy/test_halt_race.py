"""A halt that commits while a worker is at a tool step: nothing runs after it. The gate's
decision locks the run, so a halt committed before it is seen (the step is not executed, no
request opens on the halted run), and a tool that ran before the halt stays on the record."""

import dataclasses

import pytest

from approvals.policy import gate as gate_module
from approvals.queue.models import ApprovalRequest
from orchestration.demo.models import Refund
from orchestration.engine.runner import run_advance
from orchestration.registry import declare
from orchestration.registry.declare import workflow
from orchestration.runs.models import Run, Step
from orchestration.runs.services import run_halt, run_start

pytestmark = pytest.mark.django_db(transaction=True)


@workflow(
    "test.halt_refund",
    input_schema={"type": "object", "properties": {"amount": {"type": "number"}}},
    tools=["payments.refund"],
)
def halt_refund(ctx, amount: float) -> dict:
    return ctx.tool("payments.refund", order_id="A-1004", amount=amount, reason="broken")


def halt(run_id: int) -> None:
    """Another process: a reviewer's halt commits."""
    run_halt(run=run_id, by="ops-lead", reason="stop everything now")


def advanced(amount: float) -> Run:
    run = run_start(workflow="test.halt_refund", agent="refund-bot", input={"amount": amount})
    assert run_advance(run.pk) == "stopped"
    return Run.objects.get(pk=run.pk)


@pytest.fixture
def halt_during_review(monkeypatch):
    """The halt commits after the step started, while the gate decides."""
    review = gate_module.PolicyGate.review

    def halted_first(self, action, *, run_id, step_seq):
        halt(run_id)
        return review(self, action, run_id=run_id, step_seq=step_seq)

    monkeypatch.setattr(gate_module.PolicyGate, "review", halted_first)


def test_an_allowed_action_is_not_executed_after_a_halt(policy_gate, halt_during_review):
    run = advanced(20)
    assert run.status == "halted" and not Refund.objects.exists()


def test_no_request_opens_on_a_halted_run(policy_gate, halt_during_review):
    run = advanced(900)
    assert run.status == "halted" and not Refund.objects.exists()
    assert not ApprovalRequest.objects.filter(run_id=run.pk, status="pending").exists()


def test_a_halt_between_the_decision_and_the_request_opens_none(policy_gate, monkeypatch):
    record = gate_module._record

    def recorded_then_halted(decision, action, run):
        status = record(decision, action, run)
        halt(run.pk)
        return status

    monkeypatch.setattr(gate_module, "_record", recorded_then_halted)
    run = advanced(900)
    assert run.status == "halted"
    assert not ApprovalRequest.objects.filter(run_id=run.pk).exists()


def test_a_tool_that_ran_before_the_halt_stays_on_the_record(policy_gate, monkeypatch):
    """The halt lands while the refund executes: the money moved, and the step says so."""
    refund = declare.TOOLS["payments.refund"]

    def refund_then_halted(**kwargs):
        done = refund.fn(**kwargs)
        halt(Run.objects.get().pk)
        return done

    monkeypatch.setitem(
        declare.TOOLS, "payments.refund", dataclasses.replace(refund, fn=refund_then_halted)
    )
    run = advanced(20)
    assert run.status == "halted" and Refund.objects.get().amount == 20
    step = Step.objects.get(run=run, name="payments.refund")
    assert step.status == "completed" and step.output["amount"] == 20.0


def test_a_halt_after_the_gate_allowed_stops_the_tool_before_it_acts(policy_gate, monkeypatch):
    """The gate allowed a 20 EUR refund; a halt commits before the tool starts: the engine's
    fence just before the side effect sees it."""
    record = gate_module._record

    def recorded_then_halted(decision, action, run):
        status = record(decision, action, run)
        halt(run.pk)
        return status

    monkeypatch.setattr(gate_module, "_record", recorded_then_halted)
    run = advanced(20)
    assert run.status == "halted" and not Refund.objects.exists()


@workflow("test.halt_handoff", input_schema={"type": "object"}, tools=["payments.refund"])
def halt_handoff(ctx) -> dict:
    return ctx.handoff("refund-bot", goal="Refund 20 EUR on order A-1004.")


def test_no_child_run_starts_for_a_parent_halted_meanwhile(policy_gate, monkeypatch):
    from orchestration.engine import handoffs

    start_child = handoffs.run_start_child

    def halted_first(*, parent, **kwargs):
        halt(parent.pk)
        return start_child(parent=parent, **kwargs)

    monkeypatch.setattr(handoffs, "run_start_child", halted_first)
    run = run_start(workflow="test.halt_handoff", agent="refund-bot", input={})
    assert run_advance(run.pk) == "stopped"
    assert Run.objects.get(pk=run.pk).status == "halted"
    assert not Run.objects.filter(parent_id=run.pk).exists()
