"""Deadlines of approval requests (beat: ``approvals.tasks.sweep_requests``).

An open action request past its deadline gets its rule's ``on_expiry``: ``deny`` (the default)
expires it and the gate denies the action; ``approve`` approves the action under review;
``escalate`` hands it to the escalation team with a new deadline, once (an escalated request that
expires again is denied); ``halt`` halts the run. Shortly before a deadline the queue is warned,
once per request. Each change commits with its ledger record; the run resumes and the queue is
told after commit."""

from contextlib import suppress
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from approvals.queue.models import OPEN, ApprovalRequest, RequestKind, RequestStatus
from approvals.queue.services import lock_run_of, requests_close_for_run
from orchestration.broadcast import broadcast
from orchestration.ledger.chain import ledger_append
from orchestration.runs.services import RunError, run_halt, run_resume

ACTOR = "deadline"
WARN_FRACTION = 0.2
WARN_AT_MOST = timedelta(minutes=5)
EXPIRED_REASON = "expired without a decision"


def _queue_changed(request_id: int) -> None:
    transaction.on_commit(
        lambda: broadcast("approvals.queue", "queue.changed", request_id=request_id)
    )


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
    with transaction.atomic():
        locked = ApprovalRequest.objects.select_for_update().get(pk=request_id)
        if locked.status not in OPEN or locked.obligations.get("warned"):
            return 0
        ApprovalRequest.objects.filter(pk=locked.pk).update(
            obligations={**locked.obligations, "warned": True}
        )
        ledger_append(
            "approval.deadline_warning",
            actor=ACTOR,
            outcome="warned",
            **locked.ledger_refs(),
            payload={
                "deadline": locked.deadline.isoformat(),
                "remaining_seconds": int((locked.deadline - now).total_seconds()),
                "team": locked.team,
            },
        )
        _queue_changed(locked.pk)
    return 1


def request_expire(request_id: int, *, now=None) -> str | None:
    """Apply ``on_expiry`` to one request past its deadline; returns what happened (expired,
    approved, escalated, halted), or None if it was decided or extended meanwhile."""
    now = now or timezone.now()
    with transaction.atomic():
        lock_run_of(request_id)
        locked = ApprovalRequest.objects.select_for_update().get(pk=request_id)
        if locked.status not in OPEN or locked.deadline is None or locked.deadline > now:
            return None
        obligations = locked.obligations or {}
        on_expiry = obligations.get("on_expiry") or "deny"
        if locked.status == RequestStatus.ESCALATED and on_expiry == "escalate":
            on_expiry = "deny"  # escalated once: the second deadline denies
        common = {**locked.ledger_refs(), "actor": ACTOR}
        payload = {"deadline": locked.deadline.isoformat(), "on_expiry": on_expiry}
        if on_expiry == "approve":
            status = (
                RequestStatus.EDITED if locked.approved_args is not None else RequestStatus.APPROVED
            )
            ApprovalRequest.objects.filter(pk=locked.pk).update(
                status=status,
                approved_hash=locked.action_hash,
                decided_by=ACTOR,
                decided_at=now,
            )
            ledger_append(
                "approval.expiry_approved",
                outcome="expiry_approved",
                payload={**payload, "action_hash": locked.action_hash, "status": status},
                **common,
            )
            run_resume(run_id=locked.run_id, note="Approved on expiry of its deadline.")
            outcome = "approved"
        elif on_expiry == "escalate":
            team = obligations.get("escalation_team") or locked.team
            minutes = obligations.get("deadline_minutes") or 60
            deadline = now + timedelta(minutes=minutes)
            ApprovalRequest.objects.filter(pk=locked.pk).update(
                status=RequestStatus.ESCALATED,
                team=team,
                deadline=deadline,
                claimed_by=None,
                claimed_at=None,
                claim_expires_at=None,
            )
            ledger_append(
                "approval.escalated",
                outcome="escalated",
                payload={
                    **payload,
                    "from_team": locked.team,
                    "to_team": team,
                    "new_deadline": deadline.isoformat(),
                },
                **common,
            )
            outcome = "escalated"
        elif on_expiry == "halt":
            reason = f"approval request {locked.pk} {EXPIRED_REASON}"
            ledger_append(
                "approval.expiry_halted",
                outcome="expiry_halted",
                reason=reason,
                payload=payload,
                **common,
            )
            with suppress(RunError):  # a run already final: its request still closes
                run_halt(run=locked.run_id, by=ACTOR, reason=reason)
            requests_close_for_run(locked.run_id, by=ACTOR, reason=reason)
            outcome = "halted"
        else:
            ApprovalRequest.objects.filter(pk=locked.pk).update(
                status=RequestStatus.EXPIRED,
                reason=EXPIRED_REASON,
                decided_by=ACTOR,
                decided_at=now,
            )
            ledger_append(
                "approval.expired",
                outcome="expired",
                reason=EXPIRED_REASON,
                payload=payload,
                **common,
            )
            run_resume(run_id=locked.run_id, note="An approval request expired without a decision.")
            outcome = "expired"
        _queue_changed(locked.pk)
    return outcome
