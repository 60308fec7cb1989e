"""An approval is bound to the obligations it met: through the real engine and policy gate, a
re-decision that asks another team or more approvals than were given supersedes the approved
request and opens a new one for the same arguments; nothing executes on the first approval."""

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group

from approvals.policy.models import Rule
from approvals.policy.seed import policy_seed
from approvals.policy.services import policy_publish
from approvals.queue.models import ApprovalRequest, ReviewerTeam
from approvals.queue.services import approval_decide
from approvals.roles import REVIEWER
from orchestration.demo.models import Refund
from orchestration.demo.seed import demo_data_seed
from orchestration.ledger.chain import ledger_verify
from orchestration.ledger.models import AuditRecord
from orchestration.registry.declare import workflow
from orchestration.runs.services import run_start
from tests.orchestration.engine.conftest import drive

pytestmark = pytest.mark.django_db(transaction=True)


@workflow(
    "test.refund_amount",
    input_schema={
        "type": "object",
        "properties": {"order_id": {"type": "string"}, "amount": {"type": "number"}},
    },
    tools=["payments.refund"],
)
def refund_amount(ctx, order_id: str, amount: float) -> dict:
    return ctx.tool(
        "payments.refund",
        order_id=order_id,
        amount=amount,
        reason="It arrived broken.",
        _reasoning="The customer asked for a refund.",
        _confidence=0.8,
    )


@pytest.fixture
def policy(settings):
    """The seeded demo policy, with refunds from 200 to 500 asked of any reviewer and above 500
    of finance (rules of their own, so the test does not hang on the demo's thresholds)."""
    settings.BATON_GATE = "approvals.policy.gate.PolicyGate"
    demo_data_seed()
    policy_seed()
    common = dict(tool_patterns=["payments.refund"], outcome="ask", priority=1)
    Rule.objects.create(
        name="Mid refunds: any reviewer",
        condition="args.amount > 200.0 && args.amount <= 500.0",
        **common,
    )
    Rule.objects.create(
        name="Large refunds: finance",
        condition="args.amount > 500.0",
        team="finance",
        **common,
    )
    policy_publish(by="policy")


def reviewer(name: str, team: str):
    user = get_user_model().objects.create_user(name)
    user.groups.add(Group.objects.get(name=REVIEWER))
    ReviewerTeam.objects.get_or_create(name=team)[0].members.add(user)
    return user


def waiting(amount: float) -> ApprovalRequest:
    run = run_start(
        workflow="test.refund_amount",
        agent="refund-bot",
        input={"order_id": "A-1004", "amount": amount},
    )
    run = drive(run.pk)
    assert run.status == "waiting"
    return ApprovalRequest.objects.get(run_id=run.pk, status="pending")


def test_an_edit_into_another_teams_territory_asks_that_team_on_a_new_request(policy):
    request = waiting(300)
    assert (request.team, request.quorum) == ("", 1)
    olga = reviewer("olga", "operations")
    approval_decide(
        request=request,
        reviewer=olga,
        verdict="edit",
        args={**request.args, "amount": 1800},
        shown_hash=request.action_hash,
    )
    request.refresh_from_db()
    assert request.status == "edited"  # olga's edit met the team-less request's obligations

    run = drive(request.run_id)

    assert run.status == "waiting" and not Refund.objects.exists()  # nothing on olga's approval
    request.refresh_from_db()
    assert request.status == "superseded"
    assert request.reason == "the policy now asks the finance team"
    renewed = ApprovalRequest.objects.get(run_id=run.pk, status="pending")
    assert renewed.supersedes == request
    assert (renewed.team, renewed.quorum) == ("finance", 1)
    assert renewed.args["amount"] == 300 and renewed.approved_args["amount"] == 1800
    assert renewed.args_under_review["amount"] == 1800
    assert renewed.action_hash == request.approved_hash  # the same arguments, asked again
    assert renewed.edited_by == "olga" and not renewed.decisions.exists()
    assert "Large refunds: finance" in renewed.verdict["rules"]
    step = run.step_set.get(name="payments.refund")
    assert step.verdict["outcome"] == "pending"

    approval_decide(
        request=renewed,
        reviewer=reviewer("fay", "finance"),
        verdict="approve",
        shown_hash=renewed.action_hash,
    )
    run = drive(run.pk)
    assert run.status == "completed"
    assert float(Refund.objects.get().amount) == 1800.0
    step = run.step_set.get(name="payments.refund")
    assert step.verdict["outcome"] == "approved" and step.verdict["diff"] == {"amount": [300, 1800]}
    verbs = list(
        AuditRecord.objects.filter(run_id=run.pk, verb__startswith="approval.")
        .order_by("seq")
        .values_list("verb", flat=True)
    )
    assert verbs == [
        "approval.created",
        "approval.decided",
        "approval.superseded",
        "approval.created",
        "approval.decided",
    ]
    assert ledger_verify().ok


def test_a_quorum_raised_while_waiting_needs_the_new_quorum_of_approvals(policy):
    request = waiting(1800)
    assert (request.team, request.quorum) == ("finance", 1)
    Rule.objects.filter(name="Large refunds: finance").update(quorum=2)
    policy_publish(by="policy")
    fay, finn = reviewer("fay", "finance"), reviewer("finn", "finance")
    approval_decide(request=request, reviewer=fay, verdict="approve")
    request.refresh_from_db()
    assert request.status == "approved"  # the quorum it was opened with

    run = drive(request.run_id)

    assert run.status == "waiting" and not Refund.objects.exists()
    request.refresh_from_db()
    assert request.status == "superseded"
    assert request.reason == "the policy now asks 2 approvals, 1 given"
    renewed = ApprovalRequest.objects.get(run_id=run.pk, status="pending")
    assert (renewed.quorum, renewed.action_hash) == (2, request.action_hash)
    assert renewed.verdict["policy_version"] == request.verdict["policy_version"] + 1
    # the new request counts its own approvals: fay approves again, finn is the second
    approval_decide(request=renewed, reviewer=fay, verdict="approve")
    assert drive(run.pk).status == "waiting" and not Refund.objects.exists()
    approval_decide(request=renewed, reviewer=finn, verdict="approve")
    run = drive(run.pk)
    assert run.status == "completed" and float(Refund.objects.get().amount) == 1800.0


def test_a_rule_that_asks_anew_while_waiting_needs_an_approval_under_it(policy):
    request = waiting(1800)
    assert "Refunds above 1000: check the order" not in request.verdict["rules"]
    fay = reviewer("fay", "finance")
    approval_decide(request=request, reviewer=fay, verdict="approve")
    Rule.objects.create(
        name="Refunds above 1000: check the order",
        tool_patterns=["payments.refund"],
        condition="args.amount > 1000.0",
        outcome="ask",
        team="finance",
        priority=2,
    )  # the same team and quorum, but a reason to decide the approval never weighed
    policy_publish(by="policy")

    run = drive(request.run_id)

    assert run.status == "waiting" and not Refund.objects.exists()
    request.refresh_from_db()
    assert request.status == "superseded"
    assert request.reason == "the policy now asks under rule Refunds above 1000: check the order"
    renewed = ApprovalRequest.objects.get(run_id=run.pk, status="pending")
    assert "Refunds above 1000: check the order" in renewed.verdict["rules"]
    approval_decide(request=renewed, reviewer=fay, verdict="approve")
    run = drive(run.pk)
    assert run.status == "completed" and float(Refund.objects.get().amount) == 1800.0


def test_an_approval_that_met_what_the_re_decision_asks_executes(policy):
    request = waiting(1800)
    Rule.objects.filter(name="Large refunds: finance").update(message="Check the customer.")
    policy_publish(by="policy")  # a new version that asks the same team and quorum
    approval_decide(request=request, reviewer=reviewer("fay", "finance"), verdict="approve")
    run = drive(request.run_id)
    assert run.status == "completed" and float(Refund.objects.get().amount) == 1800.0
    request.refresh_from_db()
    assert request.status == "approved"
    step = run.step_set.get(name="payments.refund")
    assert step.verdict["outcome"] == "approved" and step.verdict["reason"] == "approved by fay"


def test_a_re_decision_that_denies_denies_whatever_was_approved(policy):
    request = waiting(1800)
    approval_decide(request=request, reviewer=reviewer("fay", "finance"), verdict="approve")
    Rule.objects.filter(name="Large refunds: finance").update(outcome="deny")
    policy_publish(by="policy")
    run = drive(request.run_id)
    assert not Refund.objects.exists()
    step = run.step_set.get(name="payments.refund")
    assert (step.verdict["outcome"], step.error_type) == ("deny", "ActionDenied")


def test_an_edit_short_of_its_quorum_does_not_execute_even_where_the_policy_allows_it(policy):
    """One reviewer of two edits a 1899 refund down to 50, which the policy would allow on its
    own: the edit is still a proposal until the second reviewer approves it."""
    request = waiting(1899)
    ApprovalRequest.objects.filter(pk=request.pk).update(quorum=2)
    approval_decide(
        request=request.pk,
        reviewer=reviewer("fay", "finance"),
        verdict="edit",
        args={"order_id": "A-1004", "amount": 50, "reason": "It arrived broken."},
    )
    run = drive(request.run_id)
    assert run.status == "waiting" and not Refund.objects.exists()
    request.refresh_from_db()
    assert request.status == "pending" and request.approved_args["amount"] == 50
    approval_decide(request=request.pk, reviewer=reviewer("fin", "finance"), verdict="approve")
    run = drive(request.run_id)
    assert run.status == "completed" and Refund.objects.get().amount == 50
