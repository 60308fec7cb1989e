"""Approve and allow similar: a reviewer's grant scoped to the run or an hour, constrained to the
approved arguments, counted, revocable, forbidden per tool, and only where the rule permits."""

import json
from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from approvals.policy.cel import compile_condition
from approvals.policy.gate import PolicyGate
from approvals.policy.models import AutonomyThreshold, Grant
from approvals.policy.services import grant_revoke, policy_publish
from approvals.policy.similar import similar_condition
from approvals.queue.models import ApprovalRequest, Decision
from approvals.queue.services import approval_decide
from orchestration.gate import Action
from orchestration.ledger.chain import ledger_verify
from orchestration.ledger.models import AuditRecord
from orchestration.registry.models import Tool
from orchestration.runs.models import Step
from orchestration.runs.services import run_start
from tests.orchestration.engine.conftest import drive

pytestmark = pytest.mark.django_db(transaction=True)


def new_run(drive_it=True):
    run = run_start(
        workflow="customer_refund",
        agent="refund-bot",
        input={"order_id": "A-1004", "reason": "It arrived broken."},
    )
    return drive(run.pk) if drive_it else run


def waiting_request() -> ApprovalRequest:
    run = new_run()
    request = ApprovalRequest.objects.get(run_id=run.pk, tool="payments.refund")
    assert request.obligations["allow_similar"] is True
    return request


def review(run_id: int, seq: int, amount: float, order_id: str = "A-1004"):
    args = {"order_id": order_id, "amount": amount, "reason": f"similar {seq}"}
    action = Action(tool="payments.refund", args=args, run_id=run_id, step_seq=seq)
    return PolicyGate().review(action, run_id=run_id, step_seq=seq)


def test_the_constraint_is_built_from_scalar_arguments_labels_and_risk_with_cel_quoting():
    condition = similar_condition(
        {
            "order_id": 'A-"1"\\x',
            "amount": 1899,
            "express": True,
            "reason": "free text",
            "body": "free text",
            "items": ["a"],
            "in": "reserved",
        },
        labels=["pii", 'x"y'],
        score=61,
    )
    assert condition == (
        'args.amount <= 1899.0 && args.express == true && args["in"] == "reserved"'
        ' && args.order_id == "A-\\"1\\"\\\\x"'
        ' && action.labels.all(label, label in ["pii", "x\\"y"])'
        ' && run.labels.all(label, label in ["pii", "x\\"y"])'
        " && risk.score <= 61"
    )
    compile_condition(condition)


def test_allow_similar_for_the_run_approves_similar_actions_of_that_run(policy_gate, reviewer):
    request = waiting_request()
    approval_decide(request=request, reviewer=reviewer, verdict="approve", allow_similar="run")
    grant = Grant.objects.get(source="reviewer")
    assert (grant.run_id, grant.expires_at, grant.max_uses, grant.uses) == (
        request.run_id,
        None,
        10,
        0,
    )
    assert grant.agent.name == "refund-bot" and grant.tool_pattern == "payments.refund"
    assert grant.condition == (
        'args.amount <= 1899.0 && args.order_id == "A-1004"'
        " && totals.agent.sum.amount <= 1899.0 && totals.run.sum.amount <= 1899.0"
        " && totals.target.sum.amount <= 1899.0"
        ' && action.labels.all(label, label in ["pii", "untrusted_input"])'
        ' && run.labels.all(label, label in ["pii", "untrusted_input"])'
        ' && run.data_subjects.all(subject, subject in ["fatima@example.com"])'
        f" && risk.score <= {request.risk_score}"
    )
    decided = AuditRecord.objects.get(approval_id=request.pk, verb="approval.decided")
    assert json.loads(decided.payload)["allow_similar"] == {"scope": "run", "grant": grant.pk}

    verdict = review(request.run_id, 100, 1500)
    assert verdict.outcome == "approved"
    assert verdict.reason == f"allowed similar by rae (grant #{grant.pk})"
    grant.refresh_from_db()
    assert grant.uses == 1
    used = AuditRecord.objects.get(verb="grant.used")
    assert (used.object_id, used.run_id, json.loads(used.payload)["uses"]) == (
        str(grant.pk),
        grant.run_id,
        1,
    )

    # above the approved amount, another order, or another run: a reviewer again
    assert review(request.run_id, 101, 2000).outcome == "pending"
    assert review(request.run_id, 102, 600, order_id="A-1001").outcome == "pending"
    other = new_run(drive_it=False)
    assert review(other.pk, 100, 1500).outcome == "pending"
    grant.refresh_from_db()
    assert grant.uses == 1
    assert ledger_verify().ok


def test_allow_similar_for_an_hour_covers_other_runs_until_it_expires(policy_gate, reviewer):
    request = waiting_request()
    before = timezone.now()
    approval_decide(request=request, reviewer=reviewer, verdict="approve", allow_similar="hour")
    grant = Grant.objects.get(source="reviewer")
    assert grant.run_id is None
    assert before + timedelta(minutes=59) < grant.expires_at <= timezone.now() + timedelta(hours=1)
    other = new_run(drive_it=False)
    assert review(other.pk, 100, 1000).outcome == "approved"
    Grant.objects.filter(pk=grant.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert review(other.pk, 101, 1000).outcome == "pending"


def test_the_totals_clauses_quote_odd_argument_names():
    totals = {"run": {"count": 2, "sum": {"amount": 600, "in": 1.5}}, "target": {"count": 1}}
    condition = similar_condition({}, labels=[], score=1, totals=totals)
    assert condition.startswith(
        'totals.run.sum.amount <= 600.0 && totals.run.sum["in"] <= 1.5 && action.labels'
    )
    compile_condition(condition)


def test_a_grant_never_takes_a_total_past_what_was_approved(policy_gate, reviewer):
    """Finance approved one 1899 refund of A-1004 and allowed similar ones for an hour: once it
    executed, a further refund of that order in another run takes the order's total past 1899,
    which no one approved."""
    from orchestration.demo.models import Refund

    request = waiting_request()
    assert request.verdict["totals"]["target"] == {"count": 1, "sum": {"amount": 1899.0}}
    approval_decide(request=request, reviewer=reviewer, verdict="approve", allow_similar="hour")
    assert drive(request.run_id).status == "completed"
    assert [float(r.amount) for r in Refund.objects.all()] == [1899.0]
    other = new_run(drive_it=False)
    assert review(other.pk, 100, 1).outcome == "pending"
    assert Grant.objects.get(source="reviewer").uses == 0


def test_an_edited_approval_constrains_similar_actions_to_the_edit(policy_gate, reviewer):
    request = waiting_request()
    edited = {**request.args, "amount": 800}
    approval_decide(
        request=request, reviewer=reviewer, verdict="edit", args=edited, allow_similar="run"
    )
    grant = Grant.objects.get(source="reviewer")
    assert "args.amount <= 800.0" in grant.condition
    assert review(request.run_id, 100, 700).outcome == "approved"
    assert review(request.run_id, 101, 900).outcome == "pending"


def test_a_grant_is_used_at_most_max_uses_times(policy_gate, reviewer):
    request = waiting_request()
    approval_decide(request=request, reviewer=reviewer, verdict="approve", allow_similar="run")
    grant = Grant.objects.get(source="reviewer")
    Grant.objects.filter(pk=grant.pk).update(max_uses=2)
    outcomes = [review(request.run_id, 100 + i, 1000).outcome for i in range(3)]
    assert outcomes == ["approved", "approved", "pending"]
    grant.refresh_from_db()
    assert grant.uses == 2
    assert AuditRecord.objects.filter(verb="grant.used").count() == 2


def test_a_revoked_grant_allows_nothing(policy_gate, reviewer):
    request = waiting_request()
    approval_decide(request=request, reviewer=reviewer, verdict="approve", allow_similar="run")
    grant = Grant.objects.get(source="reviewer")
    grant_revoke(grant=grant, by="policy")
    assert review(request.run_id, 100, 1000).outcome == "pending"


def test_admins_can_forbid_allow_similar_per_tool(policy_gate, reviewer):
    request = waiting_request()
    Tool.objects.filter(name="payments.refund").update(allow_similar_forbidden=True)
    with pytest.raises(ValidationError, match="forbid"):
        approval_decide(request=request, reviewer=reviewer, verdict="approve", allow_similar="run")
    request.refresh_from_db()
    assert request.status == "pending"  # nothing of the decision was kept
    assert not Decision.objects.exists() and not Grant.objects.filter(source="reviewer").exists()


def test_allow_similar_needs_the_rule_and_an_approval(policy_gate, reviewer):
    request = waiting_request()
    with pytest.raises(ValidationError):
        approval_decide(
            request=request,
            reviewer=reviewer,
            verdict="reject",
            comment="no",
            allow_similar="run",
        )
    with pytest.raises(ValidationError):
        approval_decide(request=request, reviewer=reviewer, verdict="approve", allow_similar="day")
    ApprovalRequest.objects.filter(pk=request.pk).update(
        obligations={**request.obligations, "allow_similar": False}
    )
    with pytest.raises(ValidationError, match="does not permit"):
        approval_decide(request=request, reviewer=reviewer, verdict="approve", allow_similar="run")
    assert not Grant.objects.filter(source="reviewer").exists()
    approval_decide(request=request, reviewer=reviewer, verdict="approve")  # plain approval: fine


def test_allow_similar_needs_the_deciding_approval(policy_gate, reviewer):
    request = waiting_request()
    ApprovalRequest.objects.filter(pk=request.pk).update(quorum=2)
    with pytest.raises(ValidationError, match="quorum 2"):
        approval_decide(request=request, reviewer=reviewer, verdict="approve", allow_similar="run")


def secret_read(run_id: int, seq: int = 90) -> None:
    Step.objects.create(
        run_id=run_id,
        seq=seq,
        kind="tool",
        name="infra.describe_volume",
        status="completed",
        output={"contains": "postgres://billing:hunter22@db/billing"},
        labels=["secret"],
        idempotency_key=f"{run_id}-{seq}",
    )


def test_a_grant_covers_only_data_the_approved_action_touched(policy_gate, reviewer):
    """Hole 6: a grant made for an action on customer data does not approve a later one in a
    run that has read a secret (the labels are not within the approved ones)."""
    request = waiting_request()
    approval_decide(request=request, reviewer=reviewer, verdict="approve", allow_similar="run")
    assert review(request.run_id, 100, 1000).outcome == "approved"
    secret_read(request.run_id)
    verdict = review(request.run_id, 101, 1000)
    assert verdict.outcome == "pending"  # the same arguments, but the run now holds a secret
    assert Grant.objects.get(source="reviewer").uses == 1


def test_a_grant_covers_no_riskier_action_and_nothing_above_the_deny_threshold(
    policy_gate, reviewer
):
    request = waiting_request()
    approval_decide(request=request, reviewer=reviewer, verdict="approve", allow_similar="run")
    run_id = request.run_id
    args = {"order_id": "A-1004", "amount": 1000, "reason": "r"}

    def decided(seq, confidence):
        action = Action(
            tool="payments.refund", args=args, run_id=run_id, step_seq=seq, confidence=confidence
        )
        return PolicyGate().review(action, run_id=run_id, step_seq=seq)

    riskier = decided(100, 0.1)  # a low stated confidence adds risk
    assert riskier.score > request.risk_score and riskier.outcome == "pending"

    # a grant whose condition holds still never approves above the deny threshold
    Grant.objects.filter(source="reviewer").update(condition="true")
    AutonomyThreshold.objects.filter(autonomy="supervised").update(deny_above=60)
    policy_publish(by="policy")
    above = decided(101, 0.8)
    assert above.score > 60 and above.outcome == "pending"
    AutonomyThreshold.objects.filter(autonomy="supervised").update(deny_above=99)
    policy_publish(by="policy")
    assert decided(102, 0.8).outcome == "approved"


def test_the_grant_goes_to_the_agent_that_proposed_the_action_not_the_runs(policy_gate, reviewer):
    """A nested agent's approved action grants similar actions to that agent: the run's own
    agent gains nothing it was never approved for."""
    request = waiting_request()
    ApprovalRequest.objects.filter(pk=request.pk).update(agent="travel-agent")
    approval_decide(request=request, reviewer=reviewer, verdict="approve", allow_similar="run")
    assert Grant.objects.get(source="reviewer").agent.name == "travel-agent"


def lookup_of(run_id: int, seq: int, order_id: str) -> dict:
    """A completed orders.lookup step, as the engine records it: personal data (pii) about the
    order's customer."""
    from orchestration.demo.models import Order

    order = Order.objects.get(order_id=order_id)
    output = {
        "order_id": order_id,
        "customer_name": order.customer_name,
        "customer_email": order.customer_email,
    }
    Step.objects.create(
        run_id=run_id, seq=seq, kind="tool", name="orders.lookup", status="completed",
        output=output, labels=["pii"], idempotency_key=f"{run_id}-{seq}",
    )  # fmt: skip
    return output


def test_a_grant_for_one_customers_data_never_sends_another_customers(policy_gate, reviewer):
    """Hole 6, one step aside: an email to a partner carrying Dana's data, approved and allowed
    similar for the run, does not approve the same email once the run has read Fatima's."""
    run = new_run(drive_it=False)
    dana = lookup_of(run.pk, 1, "A-1002")

    def email(seq: int, customer: dict):
        args = {
            "to": "partner@hotel.example",
            "subject": "Guest details",
            "body": f"Please welcome {customer['customer_name']}.",
        }
        action = Action(tool="email.send", args=args, run_id=run.pk, step_seq=seq)
        return PolicyGate().review(action, run_id=run.pk, step_seq=seq)

    assert email(2, dana).outcome == "pending"
    request = ApprovalRequest.objects.get(run_id=run.pk, step_seq=2)
    assert request.verdict["data_subjects"] == [dana["customer_email"]]
    approval_decide(request=request, reviewer=reviewer, verdict="approve", allow_similar="run")
    assert email(3, dana).outcome == "approved"  # the grant covers Dana's data

    fatima = lookup_of(run.pk, 4, "A-1004")
    assert email(5, fatima).outcome == "pending"  # not Fatima's: a reviewer again
    assert Grant.objects.get(source="reviewer").uses == 1
