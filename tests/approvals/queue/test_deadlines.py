"""Deadlines: each ``on_expiry`` outcome, escalation once then deny, the warning before expiry
(once), their ledger records, and the gate's verdict after expiry."""

import json
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.utils import timezone

from approvals.policy.models import Rule
from approvals.policy.services import policy_publish
from approvals.queue import transitions
from approvals.queue.deadlines import requests_sweep
from approvals.queue.models import ApprovalRequest, ReviewerTeam
from approvals.queue.services import approval_decide
from approvals.roles import REVIEWER
from approvals.tasks import sweep_requests
from orchestration.canonical import action_hash
from orchestration.demo.models import Refund
from orchestration.ledger.chain import ledger_verify
from orchestration.ledger.models import AuditRecord
from orchestration.runs.models import Run
from orchestration.runs.services import run_start
from tests.orchestration.engine.conftest import drive

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def broadcasts(monkeypatch):
    sent = []
    monkeypatch.setattr(
        transitions, "broadcast", lambda group, event, **ids: sent.append((group, event, ids))
    )
    return sent


def waiting_refund(**obligations) -> ApprovalRequest:
    run = drive(
        run_start(
            workflow="customer_refund",
            agent="refund-bot",
            input={"order_id": "A-1004", "reason": "It arrived broken."},
        ).pk
    )
    assert run.status == "waiting"
    request = ApprovalRequest.objects.get(run_id=run.pk, tool="payments.refund")
    if obligations:
        ApprovalRequest.objects.filter(pk=request.pk).update(
            obligations={**request.obligations, **obligations}
        )
    request.refresh_from_db()
    return request


def overdue(request: ApprovalRequest) -> None:
    ApprovalRequest.objects.filter(pk=request.pk).update(
        deadline=timezone.now() - timedelta(seconds=1)
    )


def verbs(request: ApprovalRequest) -> list[str]:
    return list(
        AuditRecord.objects.filter(approval_id=request.pk)
        .order_by("seq")
        .values_list("verb", flat=True)
    )


def test_by_default_an_expired_request_is_denied_by_the_gate(policy_gate, broadcasts):
    request = waiting_refund()
    assert request.obligations["on_expiry"] == "deny"
    assert requests_sweep()["expired"] == 0  # not yet due
    overdue(request)
    assert requests_sweep()["expired"] == 1
    request.refresh_from_db()
    assert (request.status, request.decided_by, request.reason) == (
        "expired",
        "deadline",
        "expired without a decision",
    )
    assert "approval.expired" in verbs(request)
    assert ("approvals.queue", "queue.changed", {"request_id": request.pk}) in broadcasts
    assert requests_sweep()["expired"] == 0  # once

    run = drive(request.run_id)
    step = run.step_set.get(name="payments.refund")
    assert step.verdict["outcome"] == "deny"
    assert step.verdict["reason"] == "expired without a decision"
    assert step.error_type == "ActionDenied"
    assert not Refund.objects.exists()
    assert ledger_verify().ok


def rules_of(request: ApprovalRequest, **fields) -> None:
    """The policy's rules that asked ``request`` now say ``fields``: published."""
    Rule.objects.filter(name__in=request.verdict["rules"]).update(**fields)
    policy_publish(by="policy")


def test_on_expiry_approve_approves_the_action_under_review(policy_gate, broadcasts):
    request = waiting_refund()
    rules_of(request, on_expiry="approve")
    request = waiting_refund(on_expiry="approve")  # the same, as opened under that policy
    overdue(request)
    assert requests_sweep()["approved"] == 1
    request.refresh_from_db()
    assert request.status == "approved" and request.decided_by == "deadline"
    assert request.approved_hash == request.action_hash
    assert "approval.expiry_approved" in verbs(request)
    drive(request.run_id)
    assert Refund.objects.get().amount == 1899


def test_on_expiry_approve_discards_an_edit_short_of_its_quorum(policy_gate, broadcasts):
    request = waiting_refund()
    rules_of(request, on_expiry="approve", quorum=2)
    request = waiting_refund(on_expiry="approve")
    assert request.quorum == 2
    mallory = get_user_model().objects.create_user("mallory")
    mallory.groups.add(Group.objects.get(name=REVIEWER))
    if request.team:
        ReviewerTeam.objects.get_or_create(name=request.team)[0].members.add(mallory)
    edited = approval_decide(
        request=request, reviewer=mallory, verdict="edit", args={**request.args, "amount": 480}
    )
    assert (edited.status, edited.edited_by) == ("pending", "mallory")
    overdue(request)

    assert requests_sweep()["approved"] == 1

    request.refresh_from_db()
    assert (request.status, request.approved_args, request.edited_by) == ("approved", None, "")
    assert request.approved_hash == request.action_hash == action_hash(request.tool, request.args)
    record = AuditRecord.objects.get(approval_id=request.pk, verb="approval.expiry_approved")
    discarded = json.loads(record.payload)["discarded_edit"]
    assert discarded["action_hash"] == edited.action_hash and discarded["edited_by"] == "mallory"
    assert discarded["diff"] == {"amount": [1899, 480]}
    drive(request.run_id)
    assert Refund.objects.get().amount == 1899  # the agent's proposal, not mallory's edit
    assert ledger_verify().ok


def test_an_approval_on_expiry_holds_only_while_the_policy_still_approves_on_expiry(
    policy_gate, broadcasts
):
    request = waiting_refund(on_expiry="approve")  # the policy itself says deny on expiry
    overdue(request)
    assert requests_sweep()["approved"] == 1
    run = drive(request.run_id)
    assert run.status == "waiting" and not Refund.objects.exists()
    request.refresh_from_db()
    assert request.status == "superseded"
    renewed = ApprovalRequest.objects.get(supersedes=request)
    assert (renewed.status, renewed.obligations["on_expiry"]) == ("pending", "deny")
    assert renewed.action_hash == request.action_hash


def test_escalation_happens_once_then_the_request_is_denied(policy_gate, broadcasts):
    request = waiting_refund(on_expiry="escalate", escalation_team="operations")
    overdue(request)
    before = timezone.now()
    assert requests_sweep()["escalated"] == 1
    request.refresh_from_db()
    assert (request.status, request.team) == ("escalated", "operations")
    minutes = request.obligations["deadline_minutes"]
    assert request.deadline >= before + timedelta(minutes=minutes)
    assert "approval.escalated" in verbs(request)
    # an operations reviewer now sees it
    ops = get_user_model().objects.create_user("ops")
    ReviewerTeam.objects.get_or_create(name="operations")[0].members.add(ops)
    from approvals.access import visible_to

    assert visible_to(ops).filter(pk=request.pk).exists()

    assert requests_sweep(now=request.deadline - timedelta(seconds=1))["expired"] == 0
    assert requests_sweep(now=request.deadline + timedelta(seconds=1))["expired"] == 1
    request.refresh_from_db()
    assert request.status == "expired"
    assert verbs(request).count("approval.escalated") == 1
    run = drive(request.run_id)
    assert run.step_set.get(name="payments.refund").verdict["outcome"] == "deny"


def test_on_expiry_halt_halts_the_run_and_closes_its_requests(policy_gate, broadcasts):
    request = waiting_refund(on_expiry="halt")
    overdue(request)
    assert requests_sweep()["halted"] == 1
    request.refresh_from_db()
    run = Run.objects.get(pk=request.run_id)
    assert run.status == "halted" and run.halted_by == "deadline"
    assert "expired without a decision" in run.halt_reason
    assert request.status == "halted"
    assert {"approval.expiry_halted", "approval.halted"} <= set(verbs(request))
    assert AuditRecord.objects.filter(run_id=run.pk, verb="run.halted").exists()
    assert ledger_verify().ok


def test_a_warning_is_recorded_once_shortly_before_the_deadline(policy_gate, broadcasts):
    request = waiting_refund()  # 60 minutes: warned in the last 5
    deadline = request.deadline
    assert requests_sweep(now=deadline - timedelta(minutes=6))["warned"] == 0
    assert requests_sweep(now=deadline - timedelta(minutes=4))["warned"] == 1
    assert requests_sweep(now=deadline - timedelta(minutes=3))["warned"] == 0
    request.refresh_from_db()
    assert request.obligations["warned"] is True and request.status == "pending"
    assert verbs(request).count("approval.deadline_warning") == 1
    assert ("approvals.queue", "queue.changed", {"request_id": request.pk}) in broadcasts


def test_a_short_window_is_warned_in_its_last_fifth(policy_gate, broadcasts):
    request = waiting_refund()
    deadline = request.created_at + timedelta(minutes=10)
    ApprovalRequest.objects.filter(pk=request.pk).update(deadline=deadline)
    assert requests_sweep(now=deadline - timedelta(minutes=3))["warned"] == 0
    assert requests_sweep(now=deadline - timedelta(minutes=1))["warned"] == 1


def test_the_beat_task_sweeps_claims_and_deadlines(policy_gate, broadcasts):
    request = waiting_refund()
    overdue(request)
    result = sweep_requests()
    assert result["expired"] == 1 and result["claims_released"] == 0
