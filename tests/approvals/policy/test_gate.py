"""The policy gate driving the real engine: verdicts in the timeline, asks waiting for
approval, resume re-evaluated when the policy or the arguments changed."""

import pytest

from approvals.policy.models import PolicyEvaluation, Rule
from approvals.policy.services import policy_publish
from approvals.queue.models import ApprovalRequest
from approvals.queue.services import approval_decide
from orchestration.demo.models import Email, Refund
from orchestration.ledger.chain import ledger_verify
from orchestration.ledger.models import AuditRecord
from orchestration.runs.services import run_start
from tests.orchestration.engine.conftest import drive

pytestmark = pytest.mark.django_db(transaction=True)


def refund(order_id="A-1004", reason="It arrived broken."):
    return run_start(
        workflow="customer_refund",
        agent="refund-bot",
        input={"order_id": order_id, "reason": reason},
    )


def test_a_large_refund_waits_for_finance_then_runs_on_approval(policy_gate, reviewer):
    run = drive(refund().pk)
    assert run.status == "waiting"
    request = ApprovalRequest.objects.get(run_id=run.pk)
    assert (request.tool, request.team, request.status) == ("payments.refund", "finance", "pending")
    assert request.args["amount"] == 1899
    step = run.step_set.get(name="payments.refund")
    assert step.verdict["outcome"] == "pending"
    assert "Large refunds need finance" in step.verdict["rules"]
    assert not Refund.objects.exists()

    approval_decide(request=request, reviewer=reviewer, verdict="approve")
    run = drive(run.pk)
    assert Refund.objects.get().amount == 1899
    # the confirmation goes to the customer the data is about: no one needs to decide that
    assert run.status == "completed"
    assert Email.objects.get().to == "fatima@example.com"
    assert not ApprovalRequest.objects.filter(run_id=run.pk, tool="email.send").exists()
    assert ledger_verify().ok
    verbs = set(AuditRecord.objects.filter(run_id=run.pk).values_list("verb", flat=True))
    assert {"policy.ask", "policy.allow", "approval.created", "approval.decided"} <= verbs


def test_an_edited_approval_executes_the_edited_arguments(policy_gate, reviewer):
    run = drive(refund().pk)
    request = ApprovalRequest.objects.get(run_id=run.pk)
    edited = {**request.args, "amount": 80}
    approval_decide(request=request, reviewer=reviewer, verdict="edit", args=edited)
    drive(run.pk)
    assert float(Refund.objects.get().amount) == 80.0
    step = run.step_set.get(name="payments.refund")
    assert step.verdict["outcome"] == "approved"
    assert step.verdict["diff"] == {"amount": [1899, 80]}


def test_resume_asks_again_when_the_policy_changed_meanwhile(policy_gate, reviewer):
    run = drive(refund().pk)
    assert run.status == "waiting"
    Rule.objects.filter(name="Large refunds need finance").update(outcome="deny")
    policy_publish(by="policy")
    ApprovalRequest.objects.filter(run_id=run.pk).update(status="approved", approved_hash="stale")
    from orchestration.runs.services import run_resume

    run_resume(run_id=run.pk)
    run = drive(run.pk)
    assert not Refund.objects.exists()  # the new policy denies what was waiting
    step = run.step_set.get(name="payments.refund")
    assert (step.status, step.error_type) == ("failed", "ActionDenied")
    # the workflow rerouted: it now writes to the customer
    assert "could not refund" in Email.objects.get(to="fatima@example.com").body
    assert step.verdict["outcome"] == "deny" and step.verdict["policy_version"] == 2


def test_a_rejection_reroutes_the_workflow(policy_gate, reviewer):
    run = drive(refund().pk)
    request = ApprovalRequest.objects.get(run_id=run.pk)
    approval_decide(
        request=request,
        reviewer=reviewer,
        verdict="reject",
        comment="Refund to store credit instead",
    )
    run = drive(run.pk)
    assert not Refund.objects.exists()
    step = run.step_set.get(name="payments.refund")
    assert (step.error_type, step.error) == ("ActionRejected", "Refund to store credit instead")
    assert "Refund to store credit instead" in Email.objects.get().body  # the reroute


def test_every_decision_is_stored_with_its_input(policy_gate):
    run = drive(refund(order_id="A-1001").pk)  # small refund: allowed by rule
    evaluations = PolicyEvaluation.objects.filter(run_id=run.pk).order_by("id")
    tools = [e.tool for e in evaluations]
    assert tools[:2] == ["orders.lookup", "payments.refund"]
    refund_eval = evaluations.get(tool="payments.refund")
    assert refund_eval.outcome == "allow"
    assert refund_eval.rules == ["Small refunds within policy"]
    assert refund_eval.input["args"] == {
        "amount": 89,
        "order_id": "A-1001",
        "reason": "It arrived broken.",
    }
    assert refund_eval.policy_version == 1


def test_the_demo_policy_sends_the_first_runs_risky_actions_to_reviewers(policy_gate):
    from orchestration.demo.seed import demo_runs_seed

    runs = {run.workflow: drive(run.pk) for run in demo_runs_seed()}
    assert {w: r.status for w, r in runs.items()} == {
        "customer_refund": "waiting",
        "travel_booking": "waiting",
        "infra_change": "waiting",
    }
    open_requests = {
        (r.run_id, r.kind, r.tool, r.team, r.quorum)
        for r in ApprovalRequest.objects.filter(status="pending")
    }
    assert open_requests == {
        (runs["customer_refund"].pk, "action", "payments.refund", "finance", 1),
        (runs["travel_booking"].pk, "question", "", "", 1),
        (runs["infra_change"].pk, "action", "infra.run_migration", "operations", 1),
    }
    # routine reads ran on their own; the 649 EUR refund is above the order's 500 EUR
    refund_steps = runs["customer_refund"].step_set.filter(kind="tool")
    assert [(s.name, s.verdict["outcome"]) for s in refund_steps] == [
        ("orders.lookup", "allow"),
        ("payments.refund", "pending"),
    ]


def test_allowed_and_approved_verdicts_carry_the_canonical_arguments_to_execute(
    policy_gate, reviewer
):
    from approvals.policy.gate import PolicyGate
    from orchestration.gate import Action

    run = drive(refund(order_id="A-1001").pk)
    raw = {"order_id": " A-1001 ", "amount": 5.0, "reason": "Broken.  "}
    gate = PolicyGate()
    allowed = gate.review(
        Action(tool="orders.lookup", args={"order_id": " A-1001 "}, run_id=run.pk, step_seq=90),
        run_id=run.pk,
        step_seq=90,
    )
    assert (allowed.outcome, allowed.args) == ("allow", {"order_id": "A-1001"})

    Rule.objects.create(
        name="Ask every refund",
        tool_patterns=["payments.refund"],
        outcome="ask",
        priority=1,
        condition="true",
    )
    policy_publish(by="policy")
    action = Action(tool="payments.refund", args=raw, run_id=run.pk, step_seq=91)
    assert gate.review(action, run_id=run.pk, step_seq=91).outcome == "pending"
    request = ApprovalRequest.objects.get(run_id=run.pk, step_seq=91)
    assert request.args == {"amount": 5, "order_id": "A-1001", "reason": "Broken."}
    approval_decide(request=request, reviewer=reviewer, verdict="approve")
    approved = gate.review(action, run_id=run.pk, step_seq=91)
    assert (approved.outcome, approved.args) == ("approved", request.args)
