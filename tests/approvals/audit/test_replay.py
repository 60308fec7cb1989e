"""The run replay: a real run through the policy gate and two reviewers; its page shows the steps
in order with each verdict of the gate and each human decision at its step, and the run's own
records (created, started, completed) around them."""

import re

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.test import Client

from approvals.policy.models import PolicyEvaluation, Rule
from approvals.policy.seed import policy_seed
from approvals.queue.models import ApprovalRequest, Decision, ReviewerTeam
from approvals.queue.services import approval_decide
from approvals.roles import POLICY_ADMIN, REVIEWER
from orchestration.demo.models import Refund
from orchestration.demo.seed import demo_data_seed
from orchestration.ledger.models import AuditRecord
from orchestration.runs.services import run_start
from tests.approvals.audit.conftest import account, client_for
from tests.orchestration.engine.conftest import drive

pytestmark = pytest.mark.django_db(transaction=True)


def reviewer(name: str, team: str):
    user = get_user_model().objects.create_user(name)
    ReviewerTeam.objects.get_or_create(name=team)[0].members.add(user)
    return user


def decide(run_id: int, tool: str, who, verdict: str, **kwargs) -> Decision:
    request = ApprovalRequest.objects.get(run_id=run_id, tool=tool, status="pending")
    approval_decide(
        request=request, reviewer=who, verdict=verdict, shown_hash=request.action_hash, **kwargs
    )
    return Decision.objects.get(request=request, reviewer=who)


@pytest.fixture
def refund_run(settings):
    """A refund of 1899 asked of finance, edited down to 80 by dana; the confirmation email asked
    of operations, approved by omar; the run completed."""
    settings.BATON_GATE = "approvals.policy.gate.PolicyGate"
    demo_data_seed()
    # the demo policy lets a confirmation to the customer go on its own; here it is asked
    Rule.objects.create(
        name="Confirmations are checked",
        tool_patterns=["email.send"],
        condition="true",
        outcome="ask",
        team="operations",
        priority=40,
    )
    policy_seed()
    run = run_start(
        workflow="customer_refund",
        agent="refund-bot",
        input={"order_id": "A-1004", "reason": "The laptop arrived with a cracked screen."},
    )
    run = drive(run.pk)
    assert run.status == "waiting"
    edit = decide(
        run.pk, "payments.refund", reviewer("dana", "finance"), "edit",
        args={**ApprovalRequest.objects.get(run_id=run.pk).args, "amount": 80},
        comment="Refund the screen only",
    )  # fmt: skip
    run = drive(run.pk)
    approve = decide(run.pk, "email.send", reviewer("omar", "operations"), "approve")
    run = drive(run.pk)
    assert run.status == "completed" and Refund.objects.get().amount == 80
    return run, edit, approve


def test_the_replay_shows_verdicts_and_decisions_in_place(refund_run):
    run, edit, approve = refund_run
    html = client_for(account("audrey", "Auditor")).get(f"/audit/runs/{run.pk}/").content.decode()
    steps = {s.name: s.seq for s in run.step_set.all()}
    lookup, refund = steps["orders.lookup"], steps["payments.refund"]
    email = run.step_set.get(name="email.send", kind="tool").seq

    def at(text: str, start: int = 0) -> int:
        index = html.find(text, start)
        assert index >= 0, text
        return index

    created = at('data-verb="run.created"')
    started = at('data-verb="run.started"')
    lookup_at = at(f'id="step-{lookup}"')
    refund_at = at(f'id="step-{refund}"')
    email_at = at(f'id="step-{email}"')
    completed = at('data-verb="run.completed"')
    assert created < started < lookup_at < refund_at < email_at < completed

    # The lookup: allowed by the gate, no human
    lookup_part = html[lookup_at:refund_at]
    assert "Gate: allow" in lookup_part and "Human:" not in lookup_part

    # The refund: asked (risk, rule, policy version), edited by dana, then allowed on resume
    refund_part = html[refund_at:email_at]
    asked = at("Gate: ask", refund_at)
    edited = at("Human: edit", refund_at)
    resumed = at("Gate: allow", edited)  # the edited refund, allowed by its rule on resume
    assert asked < edited < resumed < email_at
    assert "rule Small refunds within policy" in html[resumed:email_at]
    assert "Large refunds need finance" in refund_part and "policy v1" in refund_part
    evaluation = PolicyEvaluation.objects.filter(run_id=run.pk, step_seq=refund).first()
    assert f"risk {evaluation.score} · " in refund_part
    assert "by <strong>dana</strong>" in refund_part and "Refund the screen only" in refund_part
    assert f'href="/audit/decisions/{edit.pk}/"' in refund_part
    assert f'id="request-{edit.request_id}"' in refund_part
    assert len(re.findall(r'class="replay-gate verdict"', refund_part)) == 2  # ask, then again

    # The email: asked, approved by omar
    email_part = html[email_at:completed]
    assert "Gate: ask" in email_part and "Human: approve" in email_part
    assert f'href="/audit/decisions/{approve.pk}/"' in email_part and "omar" in email_part
    assert "dana" not in email_part

    records = AuditRecord.objects.filter(run_id=run.pk).count()
    assert f"{records} ledger records · 2 approval requests · 2 human decisions" in html


def test_the_replay_is_for_auditors_and_policy_admins(refund_run):
    run, _, _ = refund_run
    url = f"/audit/runs/{run.pk}/"
    assert client_for(account("pat", POLICY_ADMIN)).get(url).status_code == 200
    assert client_for(account("rev", REVIEWER)).get(url).status_code == 403
    assert client_for(account("nobody")).get(url).status_code == 403
    assert Client().get(url).status_code == 302
    assert client_for(account("aud", "Auditor")).get("/audit/runs/999999/").status_code == 404


def test_the_run_page_and_the_decision_link_to_the_replay(refund_run):
    run, edit, _ = refund_run
    auditor = client_for(account("audrey", "Auditor"))
    assert f'href="/audit/runs/{run.pk}/"' in auditor.get(f"/runs/{run.pk}/").content.decode()
    decision = auditor.get(f"/audit/decisions/{edit.pk}/").content.decode()
    assert f'href="/audit/runs/{run.pk}/#request-{edit.request_id}"' in decision
    # reviewers do not see an audit link they could not open
    dana = get_user_model().objects.get(username="dana")
    dana.groups.add(Group.objects.get(name=REVIEWER))
    page = client_for(dana).get(f"/runs/{run.pk}/").content.decode()
    assert "/audit/runs/" not in page
