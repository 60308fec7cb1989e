"""Deciding approval requests. Each decision and its ledger record commit together; the run is
resumed after commit. Quorum counts distinct reviewers approving the same action hash; an edit
makes a new hash and restarts the count. Whoever started the run, and the agent's owner, cannot
approve their own request."""

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from approvals.access import check_team
from approvals.queue.models import OPEN, ApprovalRequest, Decision, RequestKind, RequestStatus
from orchestration.broadcast import broadcast
from orchestration.canonical import action_hash, args_diff, canonical_json, sha256_hex
from orchestration.ledger.chain import ledger_append
from orchestration.registry.declare import get_tool
from orchestration.runs.models import Run
from orchestration.runs.services import run_halt, run_resume

VERDICTS = {"approve", "edit", "reject", "halt", "answer"}
SIMILAR_SCOPES = {"run", "hour"}
SIMILAR_HOUR = timedelta(hours=1)
SIMILAR_MAX_USES = 10


class AlreadyDecided(Exception):
    """The request was decided (or closed) by someone else first."""

    def __init__(self, request: ApprovalRequest) -> None:
        super().__init__(f"already {request.status} by {request.decided_by or 'someone else'}")
        self.request = request


class ClaimedByOther(Exception):
    """Another reviewer holds a live claim on the request."""

    def __init__(self, request: ApprovalRequest) -> None:
        super().__init__(f"claimed by {request.claimed_by.get_username()}")
        self.request = request


QUEUE_GROUP = "approvals.queue"


def queue_changed(request_id: int) -> None:
    """After commit, the live queue pages re-read (the event carries the id only)."""
    transaction.on_commit(lambda: broadcast(QUEUE_GROUP, "queue.changed", request_id=request_id))


def approval_claim(*, request: ApprovalRequest | int, reviewer) -> ApprovalRequest:
    """Claim an open request for a while (``BATON_CLAIM_SECONDS``); another reviewer's live
    claim is a conflict. Claiming again renews it."""
    request_id = request if isinstance(request, int) else request.pk
    with transaction.atomic():
        locked = ApprovalRequest.objects.select_for_update().get(pk=request_id)
        check_team(locked, reviewer)
        if locked.status not in OPEN:
            raise AlreadyDecided(locked)
        now = timezone.now()
        held = locked.claimed_by_id and locked.claim_expires_at and locked.claim_expires_at > now
        if held and locked.claimed_by_id != reviewer.pk:
            raise ClaimedByOther(locked)
        ApprovalRequest.objects.filter(pk=locked.pk).update(
            claimed_by=reviewer,
            claimed_at=now,
            claim_expires_at=now + timedelta(seconds=settings.BATON_CLAIM_SECONDS),
        )
        if not held:
            ledger_append(
                "approval.claimed",
                actor=reviewer,
                outcome="claimed",
                **locked.ledger_refs(),
                payload={},
            )
    queue_changed(locked.pk)
    locked.refresh_from_db()
    return locked


def approval_release(*, request: ApprovalRequest | int, reviewer) -> ApprovalRequest:
    request_id = request if isinstance(request, int) else request.pk
    with transaction.atomic():
        locked = ApprovalRequest.objects.select_for_update().get(pk=request_id)
        if locked.claimed_by_id != reviewer.pk:
            raise PermissionDenied("You do not hold this request.")
        ApprovalRequest.objects.filter(pk=locked.pk).update(
            claimed_by=None, claimed_at=None, claim_expires_at=None
        )
        ledger_append(
            "approval.released",
            actor=reviewer,
            outcome="released",
            **locked.ledger_refs(),
            payload={},
        )
    queue_changed(locked.pk)
    locked.refresh_from_db()
    return locked


def claims_expire(*, now=None) -> int:
    """Beat: idle claims lapse, so a request cannot stay stuck with an absent reviewer."""
    now = now or timezone.now()
    with transaction.atomic():
        expired = list(
            ApprovalRequest.objects.select_for_update()
            .filter(claim_expires_at__lte=now, claimed_by__isnull=False)
            .select_related("claimed_by")
        )
        for request in expired:
            queue_changed(request.pk)
            ApprovalRequest.objects.filter(pk=request.pk).update(
                claimed_by=None, claimed_at=None, claim_expires_at=None
            )
            ledger_append(
                "approval.claim_expired",
                actor="system",
                outcome="claim_expired",
                payload={"claimed_by": request.claimed_by.get_username()},
                **request.ledger_refs(),
            )
    return len(expired)


def requests_close_for_run(run_id: int, *, by, reason: str) -> int:
    """Inside a halt's transaction: every open request of the run closes, each recorded."""
    closed = 0
    for request in ApprovalRequest.objects.select_for_update().filter(
        run_id=run_id, status__in=OPEN
    ):
        ApprovalRequest.objects.filter(pk=request.pk).update(
            status=RequestStatus.HALTED,
            reason=reason,
            decided_by=by.get_username() if hasattr(by, "get_username") else str(by),
            decided_at=timezone.now(),
        )
        ledger_append(
            "approval.halted",
            actor=by,
            outcome="halted",
            reason=reason,
            **request.ledger_refs(),
            payload={"reason": reason},
        )
        queue_changed(request.pk)
        closed += 1
    return closed


def _check_separation_of_duties(request: ApprovalRequest, reviewer) -> None:
    run = Run.objects.select_related("agent").get(pk=request.run_id)
    if run.started_by_id == reviewer.pk:
        raise PermissionDenied("You started this run; another reviewer must decide.")
    if run.agent is not None and run.agent.owner_id == reviewer.pk:
        raise PermissionDenied("You own this agent; another reviewer must decide.")


def lock_run_of(request_id: int) -> None:
    """Lock the request's run first. Deciding, expiring and halting all lock the run, the
    request and the ledger's head; taking them in that order everywhere keeps a decision and a
    concurrent halt of the same run from deadlocking."""
    run_id = ApprovalRequest.objects.values_list("run_id", flat=True).get(pk=request_id)
    list(Run.objects.select_for_update().filter(pk=run_id).values_list("pk", flat=True))


def approval_decide(
    *,
    request: ApprovalRequest | int,
    reviewer,
    verdict: str,
    args: dict[str, Any] | None = None,
    comment: str = "",
    answer: str = "",
    snapshot: dict[str, Any] | None = None,
    allow_similar: str | None = None,
) -> ApprovalRequest:
    """Record one reviewer's decision. ``allow_similar`` ("run" or "hour"), with an approval that
    decides the request and where the rule permits it, also grants the agent similar actions
    (the same tool, within the approved arguments) for the run or for an hour."""
    if verdict not in VERDICTS:
        raise ValidationError(f"Unknown verdict {verdict!r}.")
    if allow_similar is not None:
        if allow_similar not in SIMILAR_SCOPES:
            raise ValidationError({"allow_similar": "Allow similar for the run or for 1 hour."})
        if verdict not in {"approve", "edit"}:
            raise ValidationError({"allow_similar": "Only an approval can allow similar actions."})
    if verdict in {"reject", "halt"} and not comment.strip():
        raise ValidationError({"comment": "A reason is required."})
    request_id = request if isinstance(request, int) else request.pk
    resume = False
    with transaction.atomic():
        lock_run_of(request_id)
        locked = ApprovalRequest.objects.select_for_update().get(pk=request_id)
        check_team(locked, reviewer)
        if locked.status not in OPEN:
            raise AlreadyDecided(locked)
        now = timezone.now()
        if (
            locked.claimed_by_id not in (None, reviewer.pk)
            and locked.claim_expires_at
            and locked.claim_expires_at > now
        ):
            raise ClaimedByOther(locked)
        if verdict in {"approve", "edit", "answer"}:
            _check_separation_of_duties(locked, reviewer)
        decided_hash, edited, diff = locked.action_hash, None, None
        if verdict == "edit":
            edited = _validated(locked.tool, args or {})
            decided_hash = action_hash(locked.tool, edited)
            diff = args_diff(locked.args, edited)
            if not diff:
                edited, verdict = None, "approve"
        if verdict == "answer":
            if locked.kind != RequestKind.QUESTION:
                raise ValidationError("Only questions take an answer.")
            if locked.choices and answer not in locked.choices:
                raise ValidationError({"answer": f"Choose one of: {', '.join(locked.choices)}."})
        shown = snapshot or {}
        try:
            decision = Decision.objects.create(
                request=locked,
                reviewer=reviewer,
                verdict=verdict,
                action_hash=decided_hash,
                edited_args=edited,
                diff=diff,
                comment=comment,
                snapshot=shown,
                snapshot_hash=sha256_hex(canonical_json(shown)),
            )
        except IntegrityError:
            raise AlreadyDecided(locked) from None
        by = reviewer.get_username()
        # Deciding an unclaimed request claims it implicitly.
        fields: dict[str, Any] = {"claimed_by": reviewer, "claimed_at": now}
        if verdict == "reject":
            fields.update({"status": RequestStatus.REJECTED, "reason": comment})
        elif verdict == "halt":
            fields.update({"status": RequestStatus.HALTED, "reason": comment})
        elif verdict == "answer":
            fields.update({"status": RequestStatus.APPROVED, "answer": answer})
        else:  # approve or edit: quorum counts approvals of the hash under review
            target_args = edited if edited is not None else locked.approved_args
            approvals = locked.decisions.filter(
                verdict__in=["approve", "edit"], action_hash=decided_hash
            ).count()
            fields.update({"action_hash": decided_hash, "approved_args": target_args})
            if approvals >= locked.quorum:
                fields["approved_hash"] = decided_hash
                fields["status"] = (
                    RequestStatus.EDITED if target_args is not None else RequestStatus.APPROVED
                )
        if "status" in fields:
            fields.update(decided_by=by, decided_at=now)
            resume = True
        ApprovalRequest.objects.filter(pk=locked.pk).update(**fields)
        similar = {}
        if allow_similar is not None:
            grant = _allow_similar(locked, fields, allow_similar, reviewer, now)
            similar = {"allow_similar": {"scope": allow_similar, "grant": grant.pk}}
        ledger_append(
            f"approval.{'answered' if verdict == 'answer' else 'decided'}",
            actor=reviewer,
            outcome=verdict,
            reason=comment or answer or "",
            **locked.ledger_refs(),
            payload={
                "verdict": verdict,
                "action_hash": decided_hash,
                "diff": diff,
                "comment": comment,
                "answer": answer,
                "snapshot_hash": decision.snapshot_hash,
                "status": fields.get("status", locked.status),
                **similar,
            },
        )
        if verdict == "halt":
            run_halt(run=locked.run_id, by=reviewer, reason=comment)
            requests_close_for_run(locked.run_id, by=reviewer, reason=comment)
            resume = False
        elif resume:
            run_resume(run_id=locked.run_id, note=f"{by} decided: {verdict}")
    queue_changed(locked.pk)
    locked.refresh_from_db()
    return locked


def _allow_similar(locked: ApprovalRequest, fields: dict[str, Any], scope: str, reviewer, now):
    """Inside the decision's transaction: the reviewer's grant for similar actions."""
    from approvals.policy.services import grant_create
    from approvals.policy.similar import REVIEWER, similar_condition
    from orchestration.registry.models import Tool

    if not (locked.obligations or {}).get("allow_similar"):
        raise ValidationError({"allow_similar": "The rule does not permit allowing similar."})
    if Tool.objects.filter(name=locked.tool, allow_similar_forbidden=True).exists():
        raise ValidationError({"allow_similar": f"Admins forbid allowing similar {locked.tool}."})
    if fields.get("status") not in (RequestStatus.APPROVED, RequestStatus.EDITED):
        raise ValidationError(
            {"allow_similar": f"Only the approval that decides (quorum {locked.quorum}) can."}
        )
    run = Run.objects.select_related("agent").get(pk=locked.run_id)
    if run.agent is None:
        raise ValidationError({"allow_similar": "This run has no agent to allow anything."})
    approved = fields["approved_args"] if fields.get("approved_args") is not None else locked.args
    return grant_create(
        agent=run.agent,
        tool_pattern=locked.tool,
        by=reviewer,
        condition=similar_condition(approved),
        run_id=run.pk if scope == "run" else None,
        expires_at=now + SIMILAR_HOUR if scope == "hour" else None,
        max_uses=SIMILAR_MAX_USES,
        source=REVIEWER,
    )


def _validated(tool: str, args: dict[str, Any]) -> dict[str, Any]:
    definition = get_tool(tool)
    errors = sorted(definition.validator.iter_errors(args), key=lambda e: list(e.path))
    if errors:
        raise ValidationError(
            {"/".join(str(p) for p in e.absolute_path) or "args": e.message for e in errors}
        )
    return args
