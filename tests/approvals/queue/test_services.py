"""Approval services: teams, claims, quorum, separation of duties, questions, halts and the race
of two reviewers deciding at once."""

import threading
from datetime import timedelta

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import connections
from django.utils import timezone

from approvals.access import visible_to
from approvals.queue.models import ApprovalRequest, Decision, ReviewerTeam
from approvals.queue.services import (
    approval_claim,
    approval_decide,
    approval_release,
    claims_expire,
)
from approvals.queue.transitions import AlreadyDecided, ClaimedByOther
from orchestration.ledger.models import AuditRecord
from tests.approvals.queue.conftest import request_for, user

pytestmark = pytest.mark.django_db


def test_reviewers_see_and_decide_only_their_teams_requests(run):
    finance, ops = user("fin", "finance"), user("ops", "operations")
    request = request_for(run)
    assert list(visible_to(finance)) == [request] and list(visible_to(ops)) == []
    with pytest.raises(PermissionDenied, match="finance team"):
        approval_decide(request=request, reviewer=ops, verdict="approve")
    with pytest.raises(PermissionDenied):
        approval_claim(request=request, reviewer=ops)


def test_the_starter_and_the_agent_owner_cannot_approve_their_own_request(run, owner):
    request = request_for(run)
    starter = run.started_by
    with pytest.raises(PermissionDenied, match="You started this run"):
        approval_decide(request=request, reviewer=starter, verdict="approve")
    ReviewerTeam.objects.get(name="finance").members.add(owner)
    with pytest.raises(PermissionDenied, match="You own this agent"):
        approval_decide(request=request, reviewer=owner, verdict="approve")
    assert not Decision.objects.exists()


def test_claims_block_others_renew_release_and_expire(run, settings):
    a, b = user("a", "finance"), user("b", "finance")
    request = request_for(run)
    approval_claim(request=request, reviewer=a)
    with pytest.raises(ClaimedByOther, match="claimed by a"):
        approval_claim(request=request, reviewer=b)
    with pytest.raises(ClaimedByOther):
        approval_decide(request=request, reviewer=b, verdict="approve")
    approval_release(request=request, reviewer=a)
    approval_claim(request=request, reviewer=b)
    ApprovalRequest.objects.filter(pk=request.pk).update(
        claim_expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert claims_expire() == 1
    request.refresh_from_db()
    assert request.claimed_by is None
    verbs = list(AuditRecord.objects.filter(approval_id=request.pk).values_list("verb", flat=True))
    assert verbs == [
        "approval.claimed",
        "approval.released",
        "approval.claimed",
        "approval.claim_expired",
    ]


def test_deciding_an_unclaimed_request_claims_it(run):
    a = user("a", "finance")
    request = approval_decide(request=request_for(run), reviewer=a, verdict="approve")
    assert (request.status, request.claimed_by, request.decided_by) == ("approved", a, "a")


def test_quorum_counts_distinct_reviewers_and_an_edit_restarts_it(run):
    a, b, c = user("a", "finance"), user("b", "finance"), user("c", "finance")
    request = request_for(run, quorum=2)
    assert approval_decide(request=request, reviewer=a, verdict="approve").status == "pending"
    with pytest.raises(AlreadyDecided):  # one decision per reviewer per request
        approval_decide(request=request, reviewer=a, verdict="approve")
    edited = approval_decide(
        request=request, reviewer=b, verdict="edit", args={"order_id": "A-1004", "amount": 500}
    )
    assert edited.status == "pending"  # a new hash: a's approval no longer counts
    assert edited.approved_args == {"order_id": "A-1004", "amount": 500}
    done = approval_decide(request=request, reviewer=c, verdict="approve")
    assert done.status == "edited" and done.approved_hash == edited.action_hash


def test_an_edit_is_validated_against_the_tool_schema(run):
    a = user("a", "finance")
    with pytest.raises(ValidationError) as error:
        approval_decide(
            request=request_for(run),
            reviewer=a,
            verdict="edit",
            args={"order_id": "A-1004", "amount": -5},
        )
    assert "amount" in error.value.message_dict
    assert not Decision.objects.exists()


def test_reject_and_halt_need_a_reason(run):
    a = user("a", "finance")
    request = request_for(run)
    for verdict in ("reject", "halt"):
        with pytest.raises(ValidationError, match="reason is required"):
            approval_decide(request=request, reviewer=a, verdict=verdict, comment=" ")


def test_halting_from_a_request_halts_the_run_and_closes_its_other_requests(run):
    a = user("a", "finance")
    first, second = request_for(run, seq=1), request_for(run, seq=2)
    approval_decide(request=first, reviewer=a, verdict="halt", comment="wrong customer")
    run.refresh_from_db()
    second.refresh_from_db()
    assert run.status == "halted" and run.halt_reason == "wrong customer"
    assert second.status == "halted"


def test_a_question_takes_one_of_its_choices(run):
    a = user("a", "finance")
    question = ApprovalRequest.objects.create(
        run_id=run.pk,
        step_seq=3,
        kind="question",
        question="Which hotel?",
        choices=["A", "B"],
        team="finance",
    )
    with pytest.raises(ValidationError, match="Choose one of: A, B"):
        approval_decide(request=question, reviewer=a, verdict="answer", answer="C")
    answered = approval_decide(request=question, reviewer=a, verdict="answer", answer="B")
    assert (answered.status, answered.answer) == ("approved", "B")
    assert AuditRecord.objects.filter(verb="approval.answered", approval_id=question.pk).exists()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_parallel_decisions_on_one_request_exactly_one_wins(run):
    reviewers = [user(f"r{i}", "finance") for i in range(8)]
    request = request_for(run)
    start = threading.Barrier(len(reviewers))
    outcomes: list[str] = []

    def decide(reviewer):
        try:
            start.wait()
            approval_decide(request=request.pk, reviewer=reviewer, verdict="approve")
            outcomes.append("won")
        except AlreadyDecided as exc:
            outcomes.append(f"lost: {exc}")
        finally:
            connections.close_all()

    threads = [threading.Thread(target=decide, args=(r,)) for r in reviewers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("won") == 1
    winner = ApprovalRequest.objects.get(pk=request.pk).decided_by
    assert all(o == f"lost: already approved by {winner}" for o in outcomes if o != "won")
    assert Decision.objects.filter(request=request).count() == 1
