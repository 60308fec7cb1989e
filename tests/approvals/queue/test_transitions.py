"""The approval lifecycle's transitions: each checks the state it starts from; a decision binds to
the arguments its reviewer was shown; quorum counts distinct reviewers of one hash; the first
approver's claim ends with their decision; and, on PostgreSQL, concurrent decisions, edits and
halts serialise on the documented lock order without deadlock or a decision on unseen args."""

import threading
from datetime import timedelta
from importlib import import_module

import pytest
from django.apps import apps
from django.core.exceptions import PermissionDenied
from django.db import connections, transaction
from django.utils import timezone

from approvals.queue import transitions
from approvals.queue.deadlines import request_expire
from approvals.queue.models import ApprovalRequest, Decision
from approvals.queue.selectors import request_snapshot
from approvals.queue.services import approval_claim, approval_decide
from approvals.queue.transitions import AlreadyDecided, StaleReview
from orchestration.canonical import action_hash
from orchestration.ledger.chain import ledger_verify
from orchestration.ledger.models import AuditRecord
from orchestration.runs.services import run_halt
from tests.approvals.queue.conftest import request_for, user

pytestmark = pytest.mark.django_db

EDITED = {"order_id": "A-1004", "amount": 80}


def test_a_decision_on_arguments_no_longer_under_review_is_refused_and_writes_nothing(run):
    dana, erin = user("dana", "finance"), user("erin", "finance")
    request = request_for(run, quorum=2)
    shown_to_erin = request_snapshot(request)  # erin opens the page: the proposal, 1899
    approval_decide(
        request=request, reviewer=dana, verdict="edit", args=EDITED, shown_hash=request.action_hash
    )
    records = AuditRecord.objects.count()

    with pytest.raises(StaleReview, match=r"changed since you were shown them \(dana edited"):
        approval_decide(
            request=request,
            reviewer=erin,
            verdict="approve",
            shown_hash=shown_to_erin["action_hash"],
        )

    assert not Decision.objects.filter(reviewer=erin).exists()
    assert AuditRecord.objects.count() == records
    request.refresh_from_db()
    assert request.status == "pending"
    # shown the edit, erin approves exactly it; her snapshot says so
    shown = request_snapshot(request)
    assert shown["args"] == EDITED and shown["action_hash"] == action_hash(request.tool, EDITED)
    assert shown["edit"] == {"by": "dana", "diff": {"amount": [1899, 80]}}
    assert shown["approvals"] == ["dana"] and shown["quorum"] == 2
    done = approval_decide(
        request=request, reviewer=erin, verdict="approve", shown_hash=shown["action_hash"]
    )
    assert done.status == "edited" and done.approved_args == EDITED
    decision = Decision.objects.get(reviewer=erin)
    assert decision.snapshot == shown and decision.action_hash == done.approved_hash
    assert ledger_verify().ok


def test_quorum_counts_reviewers_of_one_hash_and_an_edit_back_to_the_proposal_counts_its_approvers(
    run,
):
    a, b, c = user("a", "finance"), user("b", "finance"), user("c", "finance")
    request = request_for(run, quorum=2)
    proposed = request.action_hash
    approval_decide(request=request, reviewer=a, verdict="approve")
    approval_decide(request=request, reviewer=b, verdict="edit", args=EDITED)
    request.refresh_from_db()
    assert (request.status, request.edited_by) == ("pending", "b")
    # c puts the proposal back: a approved exactly that hash, so it has two approvals now
    back = approval_decide(
        request=request, reviewer=c, verdict="edit", args={"order_id": "A-1004", "amount": 1899}
    )
    assert back.status == "approved" and back.approved_hash == proposed
    assert back.approved_args is None and back.edited_by == ""
    assert transitions.approvals_of(back, proposed) == ["a", "c"]


def test_the_first_approvers_claim_ends_with_their_decision(run):
    a, b = user("a", "finance"), user("b", "finance")
    request = request_for(run, quorum=2)
    approval_claim(request=request, reviewer=a)
    after = approval_decide(request=request, reviewer=a, verdict="approve")
    assert after.status == "pending" and after.claimed_by is None
    with pytest.raises(PermissionDenied, match="already decided"):
        approval_claim(request=request, reviewer=a)
    with pytest.raises(AlreadyDecided, match=r"you already decided this request \(approve\)"):
        approval_decide(request=request, reviewer=a, verdict="approve")
    assert approval_claim(request=request, reviewer=b).claimed_by == b
    done = approval_decide(request=request, reviewer=b, verdict="approve")
    assert (done.status, done.claimed_by, done.decided_by) == ("approved", b, "b")


def test_every_transition_refuses_a_request_it_does_not_start_from(run):
    a, b = user("a", "finance"), user("b", "finance")
    request = request_for(run)
    approval_decide(request=request, reviewer=a, verdict="reject", comment="No.")
    now = timezone.now()
    decided = {"reviewer": b, "shown_hash": None, "now": now}
    refused = [
        lambda r: transitions.claim(r, reviewer=b, until=now + timedelta(minutes=5), now=now),
        lambda r: transitions.release(r, reviewer=a),
        lambda r: transitions.approve(r, **decided),
        lambda r: transitions.edit(r, args=EDITED, **decided),
        lambda r: transitions.reject(r, reason="No.", **decided),
        lambda r: transitions.answer(r, answer="yes", **decided),
        lambda r: transitions.halt_decision(r, reason="Stop.", **decided),
        lambda r: transitions.halt(r, by=b, reason="Stop.", now=now),
        lambda r: transitions.expire(r, reason="late", payload={}, now=now),
        lambda r: transitions.approve_on_expiry(r, payload={}, now=now),
        lambda r: transitions.escalate(r, team="operations", deadline=now, payload={}),
        lambda r: transitions.supersede(r, reason="changed", now=now),
    ]
    records = AuditRecord.objects.count()
    for transition in refused:
        with transaction.atomic(), pytest.raises(AlreadyDecided, match="already rejected by a"):
            transition(transitions.lock(request.pk))
    assert AuditRecord.objects.count() == records
    assert ApprovalRequest.objects.get(pk=request.pk).status == "rejected"


@pytest.mark.django_db(transaction=True)
def test_transitions_run_only_inside_the_callers_transaction(run):
    request = request_for(run)
    with pytest.raises(RuntimeError, match="inside the caller's transaction"):
        transitions.lock(request.pk)


def test_an_escalated_request_escalates_no_further_and_supersede_takes_an_approved_one(run):
    request = request_for(run)
    now = timezone.now()
    with transaction.atomic():
        locked = transitions.lock(request.pk)
        transitions.escalate(locked, team="operations", deadline=now, payload={})
    with transaction.atomic(), pytest.raises(AlreadyDecided):
        transitions.escalate(transitions.lock(request.pk), team="x", deadline=now, payload={})
    approval_decide(request=request, reviewer=user("o", "operations"), verdict="approve")
    with transaction.atomic():
        transitions.supersede(transitions.lock(request.pk), reason="stricter", now=now)
    request.refresh_from_db()
    assert (request.status, request.reason) == ("superseded", "stricter")


def test_an_approval_counts_only_toward_the_quorum_of_the_team_it_was_given_under(run):
    obligations = {"team": "ops", "quorum": 2, "on_expiry": "escalate"}
    request = request_for(run, team="ops", quorum=2)
    ApprovalRequest.objects.filter(pk=request.pk).update(
        obligations={**obligations, "escalation_team": "finance"},
        deadline=timezone.now() - timedelta(seconds=1),
    )
    approval_decide(request=request, reviewer=user("olga", "ops"), verdict="approve")
    assert request_expire(request.pk) == "escalated"
    fay, finn = user("fay", "finance"), user("finn", "finance")

    after_fay = approval_decide(request=request, reviewer=fay, verdict="approve")

    # olga approved for ops, which no longer holds the request: finance needs two of its own
    assert (after_fay.status, after_fay.team) == ("escalated", "finance")
    assert transitions.approvals_of(after_fay, after_fay.action_hash) == ["fay"]
    assert request_snapshot(after_fay)["approvals"] == ["fay"]
    done = approval_decide(request=request, reviewer=finn, verdict="approve")
    assert done.status == "approved"
    assert [d.team for d in done.decisions.all()] == ["ops", "finance", "finance"]
    met = transitions.met_obligations(done)
    assert (met["team"], met["approvals"]) == ("finance", ["fay", "finn"])
    still_asked = {**obligations, "escalation_team": "finance"}  # ops, escalating to finance
    assert transitions.unmet_obligations(done, still_asked) == ""
    assert ledger_verify().ok


def test_the_migration_gives_existing_decisions_their_requests_team(run):
    backfill = import_module("approvals.migrations.0006_decision_team").backfill_team
    approval_decide(
        request=request_for(run, quorum=2), reviewer=user("a", "finance"), verdict="approve"
    )
    approval_decide(request=request_for(run, team="", seq=2), reviewer=user("b"), verdict="approve")
    Decision.objects.update(team="unset")
    backfill(apps, None)
    assert sorted(Decision.objects.values_list("team", flat=True)) == ["", "finance"]


# --- concurrency, on PostgreSQL --------------------------------------------------------------


def _race(*actions) -> list[str]:
    start = threading.Barrier(len(actions))
    outcomes: list[str] = [""] * len(actions)

    def act(i, action):
        try:
            start.wait()
            action()
            outcomes[i] = "done"
        except Exception as exc:  # the outcome is what the test asserts
            outcomes[i] = type(exc).__name__
        finally:
            connections.close_all()

    threads = [threading.Thread(target=act, args=(i, a)) for i, a in enumerate(actions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return outcomes


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_an_edit_racing_an_approval_never_lets_the_approval_count_for_the_edit(run):
    for attempt in range(6):
        request = _edit_races_approval(run, attempt)
        for decision in Decision.objects.filter(request=request, verdict="approve"):
            assert decision.snapshot["action_hash"] == decision.action_hash  # approved what it saw
    assert ledger_verify().ok


def _edit_races_approval(run, attempt: int) -> ApprovalRequest:
    first, editor, approver = (user(f"{r}{attempt}", "finance") for r in "fea")
    request = request_for(run, quorum=2, seq=10 + attempt)
    shown = request.action_hash
    approval_decide(request=request, reviewer=first, verdict="approve", shown_hash=shown)
    outcomes = _race(
        lambda: approval_decide(
            request=request.pk, reviewer=editor, verdict="edit", args=EDITED, shown_hash=shown
        ),
        lambda: approval_decide(
            request=request.pk, reviewer=approver, verdict="approve", shown_hash=shown
        ),
    )
    request.refresh_from_db()
    if outcomes == ["done", "StaleReview"]:  # the edit first: the approval saw no edit
        assert request.status == "pending" and request.approved_args == EDITED
    else:  # the approval first: the proposal has its quorum, the edit comes too late
        assert outcomes == ["AlreadyDecided", "done"]
        assert request.status == "approved" and request.approved_args is None
    return request


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_halt_racing_decisions_takes_the_locks_in_the_same_order(run):
    reviewers = [user(f"r{i}", "finance") for i in range(3)]
    requests = [request_for(run, seq=20 + i) for i in range(3)]
    outcomes = _race(
        lambda: run_halt(run=run.pk, by=reviewers[0], reason="Stop everything."),
        *(
            lambda r=r, who=who: approval_decide(request=r.pk, reviewer=who, verdict="approve")
            for r, who in zip(requests, reviewers[1:] + reviewers[:1], strict=True)
        ),
    )
    assert "OperationalError" not in outcomes and "" not in outcomes  # no deadlock, no hang
    assert outcomes[0] == "done"
    statuses = set(ApprovalRequest.objects.filter(run_id=run.pk).values_list("status", flat=True))
    assert statuses <= {"approved", "halted"}
    assert ledger_verify().ok
