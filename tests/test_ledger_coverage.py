"""The ledger is complete: every governed change writes its record in the same transaction, and
when the record cannot be written the change fails with it.

The failure is real, not simulated: ``ledger_fails`` takes the chain's head away (past the
database's guard, as only a superuser can), so the next record has nothing to extend and the
database refuses it."""

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.exceptions import ObjectDoesNotExist
from django.db import DatabaseError, transaction
from django.urls import reverse
from django.utils import timezone

from approvals.policy.drafts import agent_update, thresholds_save
from approvals.policy.gate import PolicyGate
from approvals.policy.models import AutonomyThreshold, Grant, PolicyEvaluation, PolicyVersion
from approvals.policy.seed import policy_seed
from approvals.policy.services import grant_create, grant_revoke, policy_publish
from approvals.queue.deadlines import request_expire
from approvals.queue.models import ApprovalRequest, Decision, ReviewerTeam
from approvals.queue.services import approval_claim, approval_decide, approval_release
from approvals.roles import POLICY_ADMIN, REVIEWER
from orchestration.demo.seed import demo_data_seed
from orchestration.gate import Action, Question
from orchestration.ledger.chain import ledger_append
from orchestration.ledger.models import AuditRecord, LedgerError
from orchestration.registry.models import Agent, Tool
from orchestration.registry.services import tool_update_risk
from orchestration.runs.models import Run
from orchestration.runs.services import run_halt, run_retry, run_start
from tests.orchestration.engine.conftest import drive
from tests.orchestration.ledger.conftest import tamper

pytestmark = pytest.mark.django_db

REFUND_INPUT = {"order_id": "A-1004", "reason": "It arrived broken."}
LEDGER_FAILURE = (DatabaseError, LedgerError, ObjectDoesNotExist)


@pytest.fixture
def ledger_fails():
    """Call it to make every ledger write fail in the database until ``ledger_mended()``."""

    def arm() -> None:
        with transaction.atomic():
            ledger_append("test.marker", actor="system")
        tamper("DELETE FROM orchestration_ledgerhead")

    return arm


def ledger_mended() -> None:
    """The head put back on the chain's last record."""
    last = AuditRecord.objects.order_by("seq").last()
    tamper(
        "INSERT INTO orchestration_ledgerhead (id, seq, hash) VALUES (1, %s, %s)",
        [last.seq, last.hash],
    )


@pytest.fixture
def world(settings):
    settings.BATON_GATE = "approvals.policy.gate.PolicyGate"
    demo_data_seed()
    policy_seed()
    reviewer = get_user_model().objects.create_user("rae")  # reviews and manages grants
    reviewer.groups.add(*Group.objects.filter(name__in=(REVIEWER, POLICY_ADMIN)))
    for name in ("finance", "operations"):
        ReviewerTeam.objects.get_or_create(name=name)[0].members.add(reviewer)
    agent = Agent.objects.get(name="refund-bot")
    run = Run.objects.create(workflow="customer_refund", workflow_version=1, agent=agent)
    return {"reviewer": reviewer, "agent": agent, "run": run}


def open_request(run, **fields) -> ApprovalRequest:
    from orchestration.canonical import action_hash

    args = {"order_id": "A-1004", "amount": 1899}
    return ApprovalRequest.objects.create(
        run_id=run.pk,
        step_seq=1,
        agent="refund-bot",
        tool="payments.refund",
        args=args,
        action_hash=action_hash("payments.refund", args),
        team="finance",
        risk_score=70,
        deadline=timezone.now() + timedelta(hours=1),
        **fields,
    )


def fails_and_leaves(change, snapshot, verb: str) -> None:
    """``change`` fails while the ledger cannot be written, and ``snapshot`` (the state the
    change would alter) reads the same afterwards, with no new record of ``verb``."""
    before, records = snapshot(), AuditRecord.objects.filter(verb=verb).count()
    with pytest.raises(LEDGER_FAILURE):
        change()
    assert snapshot() == before
    assert AuditRecord.objects.filter(verb=verb).count() == records


# --- runs -------------------------------------------------------------------------------------


def test_run_start_fails_without_its_record(world, ledger_fails):
    ledger_fails()
    fails_and_leaves(
        lambda: run_start(workflow="customer_refund", agent="refund-bot", input=REFUND_INPUT),
        lambda: Run.objects.count(),
        "run.created",
    )


def test_run_halt_fails_without_its_record(world, ledger_fails):
    run = world["run"]
    open_request(run)
    ledger_fails()
    fails_and_leaves(
        lambda: run_halt(run=run.pk, by=world["reviewer"], reason="stop"),
        lambda: (
            Run.objects.get(pk=run.pk).status,
            list(ApprovalRequest.objects.values_list("status", flat=True)),
        ),
        "run.halted",
    )


def test_run_retry_fails_without_its_record(world, ledger_fails):
    run = world["run"]
    Run.objects.filter(pk=run.pk).update(status="failed", error="boom")
    ledger_fails()
    fails_and_leaves(
        lambda: run_retry(run=run.pk, by=world["reviewer"]),
        lambda: Run.objects.get(pk=run.pk).status,
        "run.retried",
    )


# --- the gate ---------------------------------------------------------------------------------


def refund_action(run, amount=1899) -> Action:
    return Action(
        tool="payments.refund",
        args={"order_id": "A-1004", "amount": amount},
        run_id=run.pk,
        step_seq=3,
        agent="refund-bot",
        reasoning="The order arrived broken.",
        confidence=0.9,
    )


def test_a_gate_verdict_is_not_given_without_its_record(world, ledger_fails):
    run = world["run"]
    ledger_fails()
    fails_and_leaves(
        lambda: PolicyGate().review(refund_action(run), run_id=run.pk, step_seq=3),
        lambda: (PolicyEvaluation.objects.count(), ApprovalRequest.objects.count()),
        "policy.ask",
    )


def test_a_question_is_not_asked_without_its_record(world, ledger_fails):
    run = world["run"]
    ledger_fails()
    fails_and_leaves(
        lambda: PolicyGate().ask_human(Question("Refund or replace?"), run_id=run.pk, step_seq=2),
        lambda: ApprovalRequest.objects.count(),
        "question.asked",
    )


# --- the queue --------------------------------------------------------------------------------


def claim_state(request):
    return lambda: ApprovalRequest.objects.filter(pk=request.pk).values_list(
        "claimed_by", "status"
    )[0]


def test_claim_and_release_fail_without_their_records(world, ledger_fails):
    request = open_request(world["run"])
    ledger_fails()
    fails_and_leaves(
        lambda: approval_claim(request=request, reviewer=world["reviewer"]),
        claim_state(request),
        "approval.claimed",
    )
    ledger_mended()
    approval_claim(request=request, reviewer=world["reviewer"])
    ledger_fails()
    fails_and_leaves(
        lambda: approval_release(request=request, reviewer=world["reviewer"]),
        claim_state(request),
        "approval.released",
    )


@pytest.mark.parametrize("verdict", ["approve", "reject", "halt"])
def test_a_decision_is_not_taken_without_its_record(world, ledger_fails, verdict):
    request = open_request(world["run"])
    ledger_fails()
    fails_and_leaves(
        lambda: approval_decide(
            request=request, reviewer=world["reviewer"], verdict=verdict, comment="because"
        ),
        lambda: (
            Decision.objects.count(),
            ApprovalRequest.objects.get(pk=request.pk).status,
            Run.objects.get(pk=request.run_id).status,
        ),
        "approval.decided",
    )


@pytest.mark.parametrize(
    ("on_expiry", "verb"),
    [("deny", "approval.expired"), ("escalate", "approval.escalated")],
)
def test_an_expiry_is_not_applied_without_its_record(world, ledger_fails, on_expiry, verb):
    request = open_request(
        world["run"], obligations={"on_expiry": on_expiry, "escalation_team": "operations"}
    )
    ApprovalRequest.objects.filter(pk=request.pk).update(
        deadline=timezone.now() - timedelta(seconds=1)
    )
    ledger_fails()
    fails_and_leaves(
        lambda: request_expire(request.pk),
        lambda: ApprovalRequest.objects.filter(pk=request.pk).values_list("status", "team")[0],
        verb,
    )


# --- configuration ----------------------------------------------------------------------------


def test_publishing_fails_without_its_record(world, ledger_fails):
    from approvals.policy.models import Rule

    rule = Rule.objects.first()
    Rule.objects.filter(pk=rule.pk).update(enabled=not rule.enabled)
    ledger_fails()
    fails_and_leaves(
        lambda: policy_publish(by=world["reviewer"], note="flip a rule"),
        lambda: PolicyVersion.objects.count(),
        "policy.published",
    )


def test_threshold_changes_fail_without_their_record(world, ledger_fails):
    fields = ("allow_below", "quorum2_above", "deny_above")
    current = {
        t.autonomy: {f: getattr(t, f) for f in fields} for t in AutonomyThreshold.objects.all()
    }
    level = next(iter(current))
    changed = {level: {**current[level], "allow_below": current[level]["allow_below"] - 1}}
    ledger_fails()
    fails_and_leaves(
        lambda: thresholds_save(values=changed, by=world["reviewer"]),
        lambda: sorted(AutonomyThreshold.objects.values_list("autonomy", *fields)),
        "policy.draft_changed",
    )


def test_grants_fail_without_their_records(world, ledger_fails):
    agent = world["agent"]
    ledger_fails()
    fails_and_leaves(
        lambda: grant_create(agent=agent, tool_pattern="payments.refund", by=world["reviewer"]),
        lambda: Grant.objects.count(),
        "grant.created",
    )
    grant = Grant.objects.create(agent=agent, tool_pattern="payments.refund", run_id=7)
    fails_and_leaves(
        lambda: grant_revoke(grant=grant, by=world["reviewer"]),
        lambda: Grant.objects.get(pk=grant.pk).revoked_at,
        "grant.revoked",
    )


def test_agent_and_tool_changes_fail_without_their_records(world, ledger_fails):
    agent = world["agent"]
    other = next(
        level for level, _ in Agent._meta.get_field("autonomy").choices if level != agent.autonomy
    )
    ledger_fails()
    fails_and_leaves(
        lambda: agent_update(agent=agent, by=world["reviewer"], autonomy=other),
        lambda: Agent.objects.get(pk=agent.pk).autonomy,
        "agent.autonomy_changed",
    )
    tool = Tool.objects.get(name="payments.refund")
    fails_and_leaves(
        lambda: tool_update_risk(tool=tool, by=world["reviewer"], impact=(tool.impact + 1) % 5),
        lambda: Tool.objects.filter(pk=tool.pk).values_list("impact", "risk_overridden")[0],
        "tool.risk_changed",
    )


# --- accounts ---------------------------------------------------------------------------------


def test_a_login_fails_without_its_record(client, ledger_fails):
    get_user_model().objects.create_user("ann", password="a-long-passphrase")
    ledger_fails()
    client.raise_request_exception = False
    response = client.post(reverse("login"), {"username": "ann", "password": "a-long-passphrase"})
    assert response.status_code == 500
    assert "_auth_user_id" not in client.session
    assert not AuditRecord.objects.filter(verb="account.login").exists()


# --- what the records say ---------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_governed_run_leaves_searchable_records(world):
    reviewer = world["reviewer"]
    run = drive(
        run_start(
            workflow="customer_refund",
            agent="refund-bot",
            input=REFUND_INPUT,
        ).pk
    )
    request = ApprovalRequest.objects.get(run_id=run.pk, tool="payments.refund")
    approval_claim(request=request, reviewer=reviewer)
    approval_decide(request=request, reviewer=reviewer, verdict="reject", comment="Too much.")

    records = AuditRecord.objects.filter(run_id=run.pk)
    agent_id = world["agent"].pk
    assert set(records.values_list("workflow", flat=True)) == {"customer_refund"}
    assert set(records.values_list("agent_id", flat=True)) == {agent_id}
    ask = records.get(verb="policy.ask", tool="payments.refund")
    evaluation = PolicyEvaluation.objects.get(run_id=run.pk, tool="payments.refund")
    assert (ask.outcome, ask.risk) == ("ask", evaluation.score)
    assert ask.reason and ask.reason in ask.payload
    opened = records.get(verb="approval.created")
    assert (opened.approval_id, opened.tool, opened.risk) == (
        request.pk,
        "payments.refund",
        request.risk_score,
    )
    decided = records.get(verb="approval.decided")
    assert (decided.actor, decided.outcome, decided.reason) == ("rae", "reject", "Too much.")
    assert records.filter(verb="run.created", outcome="created").exists()
    assert records.filter(verb="run.started", outcome="started").exists()
