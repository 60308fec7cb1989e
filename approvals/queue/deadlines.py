"""Deadlines of approval requests (beat: ``approvals.tasks.sweep_requests``).

An open action request past its deadline gets its rule's ``on_expiry``: ``deny`` (the default)
expires it and the gate denies the action; ``approve`` approves the agent's own proposal (a
reviewer's edit short of its quorum is discarded);
``escalate`` hands it to the escalation team with a new deadline, once (an escalated request that
expires again is denied); ``halt`` halts the run. Shortly before a deadline the queue is warned,
once per request. Each change is a transition of ``approvals.queue.transitions``, committed with
its ledger record; the run resumes and the queue is told after commit."""

from contextlib import suppress
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from approvals.queue import transitions
from approvals.queue.models import OPEN, ApprovalRequest, RequestKind, RequestStatus
from approvals.queue.transitions import DEADLINE
from orchestration.ledger.chain import ledger_append
from orchestration.runs.services import RunError, halt_within_transaction, resume_within_transaction

WARN_FRACTION = 0.2
WARN_AT_MOST = timedelta(minutes=5)
EXPIRED_REASON = "expired without a decision"


def warn_window(request: ApprovalRequest) -> timedelta:
    """How long before its deadline a request is warned about: 20% of its window, at most 5
    minutes. The window of an escalated request is its escalation's."""
    minutes = request.obligations.get("deadline_minutes")
    if request.status == RequestStatus.ESCALATED and minutes:
        window = timedelta(minutes=minutes)
    else:
        window = request.deadline - request.created_at
    return min(window * WARN_FRACTION, WARN_AT_MOST)


def requests_sweep(*, now=None) -> dict[str, int]:
    """Apply the deadlines of every open action request, and warn those about to expire."""
    now = now or timezone.now()
    counts = {"expired": 0, "approved": 0, "escalated": 0, "halted": 0, "warned": 0}
    due = ApprovalRequest.objects.filter(
        kind=RequestKind.ACTION, status__in=OPEN, deadline__lte=now
    ).values_list("pk", flat=True)
    for pk in list(due):
        outcome = request_expire(pk, now=now)
        if outcome:
            counts[outcome] += 1
    soon = ApprovalRequest.objects.filter(
        kind=RequestKind.ACTION,
        status__in=OPEN,
        deadline__gt=now,
        deadline__lte=now + WARN_AT_MOST,
    )
    for request in list(soon):
        if not request.obligations.get("warned") and request.deadline - now <= warn_window(request):
            counts["warned"] += request_warn(request.pk, now=now)
    return counts


def request_warn(request_id: int, *, now=None) -> int:
    """Record (once) that a request's deadline is near, and tell the queue."""
    now = now or timezone.now()
    with transaction.atomic(durable=True):
        locked = transitions.lock(request_id)
        if locked.status not in OPEN or locked.obligations.get("warned"):
            return 0
        ApprovalRequest.objects.filter(pk=locked.pk).update(
            obligations={**locked.obligations, "warned": True}
        )
        ledger_append(
            "approval.deadline_warning",
            actor=DEADLINE,
            outcome="warned",
            **locked.ledger_refs(),
            payload={
                "deadline": locked.deadline.isoformat(),
                "remaining_seconds": int((locked.deadline - now).total_seconds()),
                "team": locked.team,
            },
        )
        transitions.queue_changed(locked.pk)
    return 1


def request_expire(request_id: int, *, now=None) -> str | None:
    """Apply ``on_expiry`` to one request past its deadline; returns what happened (expired,
    approved, escalated, halted), or None if it was decided or extended meanwhile."""
    now = now or timezone.now()
    with transaction.atomic(durable=True):
        locked = transitions.lock(request_id)
        if locked.status not in OPEN or locked.deadline is None or locked.deadline > now:
            return None
        obligations = locked.obligations or {}
        on_expiry = obligations.get("on_expiry") or "deny"
        if locked.status == RequestStatus.ESCALATED and on_expiry == "escalate":
            on_expiry = "deny"  # escalated once: the second deadline denies
        payload = {"deadline": locked.deadline.isoformat(), "on_expiry": on_expiry}
        if on_expiry == "approve":
            transitions.approve_on_expiry(locked, payload=payload, now=now)
            resume_within_transaction(
                run_id=locked.run_id, note="Approved on expiry of its deadline."
            )
            return "approved"
        if on_expiry == "escalate":
            team = obligations.get("escalation_team") or locked.team
            deadline = now + timedelta(minutes=obligations.get("deadline_minutes") or 60)
            transitions.escalate(locked, team=team, deadline=deadline, payload=payload)
            return "escalated"
        if on_expiry == "halt":
            reason = f"approval request {locked.pk} {EXPIRED_REASON}"
            ledger_append(
                "approval.expiry_halted",
                actor=DEADLINE,
                outcome="expiry_halted",
                reason=reason,
                payload=payload,
                **locked.ledger_refs(),
            )
            with suppress(RunError):  # a run already final: its request still closes
                halt_within_transaction(run_id=locked.run_id, by=DEADLINE, reason=reason)
            transitions.halt_run(locked.run_id, by=DEADLINE, reason=reason)
            return "halted"
        transitions.expire(locked, reason=EXPIRED_REASON, payload=payload, now=now)
        resume_within_transaction(
            run_id=locked.run_id, note="An approval request expired without a decision."
        )
        return "expired"
