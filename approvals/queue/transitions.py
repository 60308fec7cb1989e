"""The approval lifecycle: every status change of an ``ApprovalRequest`` is one transition here.

    (none)                      open           pending
    pending, escalated          claim          the same status, claimed by a reviewer
    pending, escalated          release        the same status, unclaimed (also a claim's expiry)
    pending, escalated          approve        approved or edited once the quorum of distinct
                                               reviewers of the request's current team
                                               approved the hash under review; else
                                               the same status, the approver's claim ended
    pending, escalated          edit           as approve, for the edited arguments' new hash
                                               (the edit is the editor's approval of it)
    pending, escalated          reject         rejected
    pending, escalated          answer         approved (questions)
    pending, escalated          halt           halted (every open request of the run)
    pending, escalated          expire         expired, or approved (on_expiry approve: the
                                               agent's proposal; an edit short of its quorum
                                               is discarded)
    pending                     escalate       escalated (once)
    pending, escalated,
    approved, edited            supersede      superseded (the action or its obligations changed)

Locks are taken in one order everywhere: the run's row, then the request's row (``lock``), then
the ledger's head (``ledger_append`` takes it). Every function here runs inside the caller's
transaction, on a request ``lock`` returned: it checks the current status (raising
``AlreadyDecided``, ``ClaimedByOther`` or ``StaleReview``), stamps who and when, and writes its
ledger record in that transaction; the queue is told after commit.

A decision binds to what its reviewer was shown: the caller passes the action hash the page
showed, and a decision on any other hash is refused; its snapshot is the request page's own
(``selectors.request_snapshot``), taken under the lock. An approval is bound to the hash it
approved and to the obligations it met (the request's team and quorum, under the rules and the
policy version of its verdict): ``unmet_obligations`` says whether a re-decision asks more."""

from collections.abc import Callable, Sequence
from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from approvals.queue.models import (
    APPROVALS,
    GRANTED,
    OPEN,
    ApprovalRequest,
    Decision,
    RequestKind,
    RequestStatus,
)
from approvals.queue.selectors import request_snapshot
from orchestration.broadcast import broadcast
from orchestration.canonical import action_hash, args_diff, canonical_json, sha256_hex
from orchestration.ledger.chain import ledger_append
from orchestration.runs.models import Run, RunStatus

QUEUE_GROUP = "approvals.queue"
DEADLINE = "deadline"  # who decides on expiry
UNCLAIMED = {"claimed_by": None, "claimed_at": None, "claim_expires_at": None}


class AlreadyDecided(Exception):
    """The request was decided (or closed) by someone else first, or by this reviewer before."""

    def __init__(self, request: ApprovalRequest, message: str = "") -> None:
        by = request.decided_by or "someone else"
        super().__init__(message or f"already {request.status} by {by}")
        self.request = request


class ClaimedByOther(Exception):
    """Another reviewer holds a live claim on the request."""

    def __init__(self, request: ApprovalRequest) -> None:
        super().__init__(f"claimed by {request.claimed_by.get_username()}")
        self.request = request


class AlreadyOpen(Exception):
    """The step already has an open request (another worker opened it first)."""


class StaleReview(Exception):
    """The reviewer decided on arguments that are no longer the ones under review."""

    def __init__(self, request: ApprovalRequest) -> None:
        by = f" ({request.edited_by} edited them)" if request.edited_by else ""
        super().__init__(
            f"The arguments under review changed since you were shown them{by}: "
            "review them again before deciding."
        )
        self.request = request


def queue_changed(request_id: int) -> None:
    """After commit, the live queue pages re-read (the event carries the id only)."""
    transaction.on_commit(lambda: broadcast(QUEUE_GROUP, "queue.changed", request_id=request_id))


def _in_transaction() -> None:
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("Approval transitions run inside the caller's transaction.")


class RunHalted(Exception):
    """The run was halted: no request opens for it any more."""


def _lock_run(run_id: int) -> str:
    """Lock the run's row; its status (empty if it is gone)."""
    status = Run.objects.select_for_update().filter(pk=run_id).values_list("status", flat=True)
    return next(iter(status), "")


def lock(request_id: int) -> ApprovalRequest:
    """In the caller's transaction: lock the request's run, then the request, and return it."""
    _in_transaction()
    _lock_run(ApprovalRequest.objects.values_list("run_id", flat=True).get(pk=request_id))
    return ApprovalRequest.objects.select_for_update().get(pk=request_id)


def _save(locked: ApprovalRequest, **fields: Any) -> None:
    ApprovalRequest.objects.filter(pk=locked.pk).update(**fields)
    for name, value in fields.items():
        setattr(locked, name, value)
    queue_changed(locked.pk)


def _record(locked: ApprovalRequest, verb: str, *, actor, payload: dict, **extra) -> None:
    ledger_append(verb, actor=actor, **locked.ledger_refs(), payload=payload, **extra)


def _must_be(locked: ApprovalRequest, statuses) -> None:
    if locked.status not in statuses:
        raise AlreadyDecided(locked)


def _label(by) -> str:
    return by.get_username() if hasattr(by, "get_username") else str(by)


# --- open, claim, release -----------------------------------------------------------------


def open_request(*, reason: str = "", **fields: Any) -> ApprovalRequest:
    """In the caller's transaction: a new pending request, with its ledger record. One open
    request per step: the database's constraint refuses a second (``AlreadyOpen``)."""
    _in_transaction()
    if _lock_run(fields["run_id"]) == RunStatus.HALTED:
        raise RunHalted(f"run {fields['run_id']} is halted")
    try:
        with transaction.atomic():
            request = ApprovalRequest.objects.create(status=RequestStatus.PENDING, **fields)
    except IntegrityError as exc:
        raise AlreadyOpen(f"run {fields['run_id']} step {fields['step_seq']}") from exc
    if request.kind == RequestKind.QUESTION:
        verb, outcome = "question.asked", "asked"
        payload = {"question": request.question, "choices": request.choices}
        reason = reason or request.question
    else:
        verb, outcome = "approval.created", "opened"
        payload = {
            "tool": request.tool,
            "action_hash": request.action_hash,
            "obligations": request.obligations,
        }
        if request.supersedes_id:
            payload["supersedes"] = request.supersedes_id
    _record(request, verb, actor="policy-gate", outcome=outcome, reason=reason, payload=payload)
    queue_changed(request.pk)
    return request


def _live_claim(locked: ApprovalRequest, now) -> bool:
    return bool(locked.claimed_by_id and locked.claim_expires_at and locked.claim_expires_at > now)


def claim(locked: ApprovalRequest, *, reviewer, until, now) -> None:
    """Claim (or renew the claim on) an open request; a reviewer who decided it cannot."""
    _must_be(locked, OPEN)
    held = _live_claim(locked, now)
    if held and locked.claimed_by_id != reviewer.pk:
        raise ClaimedByOther(locked)
    if locked.decisions.filter(reviewer=reviewer).exists():
        raise PermissionDenied("You already decided this request; another reviewer must.")
    _save(locked, claimed_by=reviewer, claimed_at=now, claim_expires_at=until)
    if not held:
        _record(locked, "approval.claimed", actor=reviewer, outcome="claimed", payload={})


def release(locked: ApprovalRequest, *, reviewer) -> None:
    _must_be(locked, OPEN)
    if locked.claimed_by_id != reviewer.pk:
        raise PermissionDenied("You do not hold this request.")
    _save(locked, **UNCLAIMED)
    _record(locked, "approval.released", actor=reviewer, outcome="released", payload={})


def release_expired(locked: ApprovalRequest, *, now) -> bool:
    """An idle claim lapses (whatever the status: a closed request keeps no claim either)."""
    if not locked.claimed_by_id or not locked.claim_expires_at or locked.claim_expires_at > now:
        return False
    holder = locked.claimed_by.get_username()
    _save(locked, **UNCLAIMED)
    _record(
        locked,
        "approval.claim_expired",
        actor="system",
        outcome="claim_expired",
        payload={"claimed_by": holder},
    )
    return True


# --- a reviewer's decision ----------------------------------------------------------------


def _decidable(locked: ApprovalRequest, *, reviewer, shown_hash: str | None, now) -> None:
    """Open, not held by another reviewer, not decided by this one, and showing the reviewer
    the arguments under review now (``shown_hash`` None: the caller reads them under this lock,
    so what it was shown is what is under review)."""
    _must_be(locked, OPEN)
    if locked.claimed_by_id not in (None, reviewer.pk) and _live_claim(locked, now):
        raise ClaimedByOther(locked)
    earlier = locked.decisions.filter(reviewer=reviewer).first()
    if earlier is not None:
        raise AlreadyDecided(locked, f"you already decided this request ({earlier.verdict})")
    if shown_hash is not None and shown_hash != locked.action_hash:
        raise StaleReview(locked)


def _decision(locked: ApprovalRequest, *, reviewer, verdict: str, **fields: Any) -> Decision:
    shown = request_snapshot(locked)
    return Decision.objects.create(
        request=locked,
        reviewer=reviewer,
        verdict=verdict,
        action_hash=fields.pop("action_hash", locked.action_hash),
        team=locked.team,
        snapshot=shown,
        snapshot_hash=sha256_hex(canonical_json(shown)),
        **fields,
    )


def approvals_of(request: ApprovalRequest, hash_: str) -> list[str]:
    """The distinct reviewers who approved ``hash_`` on this request (one decision each) under
    its current team: approvals given before it escalated count for the team that lost it."""
    return list(
        request.decisions.filter(verdict__in=APPROVALS, action_hash=hash_, team=request.team)
        .order_by("id")
        .values_list("reviewer__username", flat=True)
    )


def _record_decision(locked: ApprovalRequest, decision: Decision, *, reviewer, **extra) -> None:
    verdict = decision.verdict
    payload = {
        "verdict": verdict,
        "action_hash": decision.action_hash,
        "diff": decision.diff,
        "comment": decision.comment,
        "answer": extra.pop("answer", ""),
        "snapshot_hash": decision.snapshot_hash,
        "status": locked.status,
        **extra,
    }
    if locked.status in GRANTED and locked.kind == RequestKind.ACTION:
        payload["met"] = met_obligations(locked)
    _record(
        locked,
        f"approval.{'answered' if verdict == 'answer' else 'decided'}",
        actor=reviewer,
        outcome=verdict,
        reason=decision.comment or payload["answer"],
        payload=payload,
    )


def _settle(locked: ApprovalRequest, *, reviewer, now) -> None:
    """Approved once the quorum of distinct reviewers approved the hash under review; until
    then the approver's claim ends with their decision, so the next reviewer can claim."""
    approvers = approvals_of(locked, locked.action_hash)
    if len(approvers) < locked.quorum:
        _save(locked, **UNCLAIMED)
        return
    edited = locked.approved_args is not None
    _save(
        locked,
        status=RequestStatus.EDITED if edited else RequestStatus.APPROVED,
        approved_hash=locked.action_hash,
        decided_by=_label(reviewer),
        decided_at=now,
        claimed_by=reviewer,
        claimed_at=now,
        claim_expires_at=None,
    )


Also = Callable[[ApprovalRequest], dict[str, Any]] | None


def approve(
    locked: ApprovalRequest,
    *,
    reviewer,
    shown_hash: str | None,
    comment: str = "",
    also: Also = None,
    now,
) -> Decision:
    """Approve the hash under review (the arguments as proposed, or as last edited). ``also``
    runs once the state changed (e.g. the "allow similar" grant); what it returns is recorded
    with the decision."""
    _decidable(locked, reviewer=reviewer, shown_hash=shown_hash, now=now)
    decision = _decision(locked, reviewer=reviewer, verdict="approve", comment=comment)
    _settle(locked, reviewer=reviewer, now=now)
    extra = also(locked) if also else {}
    _record_decision(locked, decision, reviewer=reviewer, **_tally(locked), **extra)
    return decision


def edit(
    locked: ApprovalRequest,
    *,
    reviewer,
    shown_hash: str | None,
    args: dict[str, Any],
    comment: str = "",
    also: Also = None,
    now,
) -> Decision:
    """Edit the arguments under review (validated by the caller): a new hash, which the edit
    approves; approvals of the old hash no longer count. No change is an approval."""
    new_hash = action_hash(locked.tool, args)
    if new_hash == locked.action_hash:
        return approve(
            locked, reviewer=reviewer, shown_hash=shown_hash, comment=comment, also=also, now=now
        )
    _decidable(locked, reviewer=reviewer, shown_hash=shown_hash, now=now)
    decision = _decision(
        locked,
        reviewer=reviewer,
        verdict="edit",
        action_hash=new_hash,
        edited_args=args,
        diff=args_diff(locked.args_under_review, args),
        comment=comment,
    )
    back_to_proposal = not args_diff(locked.args, args)
    _save(
        locked,
        action_hash=new_hash,
        approved_args=None if back_to_proposal else args,
        edited_by="" if back_to_proposal else _label(reviewer),
    )
    _settle(locked, reviewer=reviewer, now=now)
    extra = also(locked) if also else {}
    _record_decision(locked, decision, reviewer=reviewer, **_tally(locked), **extra)
    return decision


def _tally(locked: ApprovalRequest) -> dict[str, Any]:
    return {"approvals": len(approvals_of(locked, locked.action_hash)), "quorum": locked.quorum}


def reject(
    locked: ApprovalRequest, *, reviewer, shown_hash: str | None, reason: str, now
) -> Decision:
    _decidable(locked, reviewer=reviewer, shown_hash=shown_hash, now=now)
    decision = _decision(locked, reviewer=reviewer, verdict="reject", comment=reason)
    _save(
        locked,
        status=RequestStatus.REJECTED,
        reason=reason,
        decided_by=_label(reviewer),
        decided_at=now,
        claimed_by=reviewer,
        claimed_at=now,
    )
    _record_decision(locked, decision, reviewer=reviewer)
    return decision


def answer(
    locked: ApprovalRequest,
    *,
    reviewer,
    shown_hash: str | None,
    answer: str,
    comment: str = "",
    now,
) -> Decision:
    _decidable(locked, reviewer=reviewer, shown_hash=shown_hash, now=now)
    if locked.kind != RequestKind.QUESTION:
        raise ValidationError("Only questions take an answer.")
    if locked.choices and answer not in locked.choices:
        raise ValidationError({"answer": f"Choose one of: {', '.join(locked.choices)}."})
    decision = _decision(locked, reviewer=reviewer, verdict="answer", comment=comment)
    _save(
        locked,
        status=RequestStatus.APPROVED,
        answer=answer,
        decided_by=_label(reviewer),
        decided_at=now,
        claimed_by=reviewer,
        claimed_at=now,
    )
    _record_decision(locked, decision, reviewer=reviewer, answer=answer)
    return decision


def halt_decision(
    locked: ApprovalRequest, *, reviewer, shown_hash: str | None, reason: str, now
) -> Decision:
    """A reviewer's decision to halt the run; the caller then halts the run, which closes its
    open requests (``halt_run``), this one included."""
    _decidable(locked, reviewer=reviewer, shown_hash=shown_hash, now=now)
    decision = _decision(locked, reviewer=reviewer, verdict="halt", comment=reason)
    _record_decision(locked, decision, reviewer=reviewer, status=RequestStatus.HALTED)
    return decision


# --- halt, expiry, escalation, supersession ----------------------------------------------


def halt(locked: ApprovalRequest, *, by, reason: str, now) -> None:
    _must_be(locked, OPEN)
    _save(locked, status=RequestStatus.HALTED, reason=reason, decided_by=_label(by), decided_at=now)
    _record(
        locked,
        "approval.halted",
        actor=by,
        outcome="halted",
        reason=reason,
        payload={"reason": reason},
    )


def halt_run(run_id: int, *, by, reason: str) -> int:
    """In a halt's transaction: every open request of the run halts, each recorded."""
    _in_transaction()
    _lock_run(run_id)
    now = timezone.now()
    open_ids = ApprovalRequest.objects.filter(run_id=run_id, status__in=OPEN).order_by("pk")
    closed = 0
    for request_id in list(open_ids.values_list("pk", flat=True)):
        locked = ApprovalRequest.objects.select_for_update().get(pk=request_id)
        if locked.status in OPEN:
            halt(locked, by=by, reason=reason, now=now)
            closed += 1
    return closed


def expire(locked: ApprovalRequest, *, reason: str, payload: dict, now) -> None:
    """Past its deadline with no decision: the gate denies the action."""
    _must_be(locked, OPEN)
    _save(locked, status=RequestStatus.EXPIRED, reason=reason, decided_by=DEADLINE, decided_at=now)
    _record(
        locked,
        "approval.expired",
        actor=DEADLINE,
        outcome="expired",
        reason=reason,
        payload=payload,
    )


def approve_on_expiry(locked: ApprovalRequest, *, payload: dict, now) -> None:
    """Past its deadline, where the rule says so: the agent's own proposal is approved. A
    reviewer's edit still short of its quorum is no one's approval: it is discarded (and
    recorded as such), never executed on the deadline's say."""
    _must_be(locked, OPEN)
    proposed = action_hash(locked.tool, locked.args)
    if locked.approved_args is not None:
        payload = {
            **payload,
            "discarded_edit": {
                "action_hash": locked.action_hash,
                "edited_by": locked.edited_by,
                "diff": args_diff(locked.args, locked.approved_args),
            },
        }
    _save(
        locked,
        status=RequestStatus.APPROVED,
        action_hash=proposed,
        approved_args=None,
        edited_by="",
        approved_hash=proposed,
        decided_by=DEADLINE,
        decided_at=now,
    )
    _record(
        locked,
        "approval.expiry_approved",
        actor=DEADLINE,
        outcome="expiry_approved",
        payload={
            **payload,
            "action_hash": proposed,
            "status": locked.status,
            "met": met_obligations(locked),
        },
    )


def escalate(locked: ApprovalRequest, *, team: str, deadline, payload: dict) -> None:
    """Hand a pending request to the escalation team with a new deadline (once)."""
    _must_be(locked, [RequestStatus.PENDING])
    from_team = locked.team
    _save(locked, status=RequestStatus.ESCALATED, team=team, deadline=deadline, **UNCLAIMED)
    _record(
        locked,
        "approval.escalated",
        actor=DEADLINE,
        outcome="escalated",
        payload={
            **payload,
            "from_team": from_team,
            "to_team": team,
            "new_deadline": deadline.isoformat(),
        },
    )


def supersede(locked: ApprovalRequest, *, reason: str, now) -> None:
    """The action or its obligations changed: this request (open, or approved for obligations
    no longer enough) is replaced by a new one."""
    _must_be(locked, [*OPEN, *GRANTED])
    _save(locked, status=RequestStatus.SUPERSEDED, reason=reason, decided_at=now, **UNCLAIMED)
    _record(
        locked,
        "approval.superseded",
        actor="policy-gate",
        outcome="superseded",
        reason=reason,
        payload={"action_hash": locked.action_hash, "reason": reason},
    )


# --- what an approval is bound to ---------------------------------------------------------


def met_obligations(request: ApprovalRequest) -> dict[str, Any]:
    """What the request's approval met: its team, the quorum it asked and the approvals given,
    under the rules and the policy version of the verdict that asked."""
    verdict = request.verdict or {}
    return {
        "team": request.team,
        "quorum": request.quorum,
        "approvals": approvals_of(request, request.approved_hash),
        "rules": verdict.get("rules") or [],
        "policy_version": verdict.get("policy_version"),
        "by": request.decided_by,
    }


def unmet_obligations(
    request: ApprovalRequest, obligations: dict[str, Any], *, rules: Sequence[str] = ()
) -> str:
    """Why an approval given on ``request`` does not meet a re-decision's ``obligations``, asked
    by its deciding ``rules`` (empty: it does). Stricter is another team than the one that
    approved (an empty team is anyone's; an escalated request's team stands for the team it
    escalated from, if the policy still escalates to it), a rule asking that was not among the
    rules of the verdict the request was approved under (a new policy version asking under the
    same rules, team and quorum is not), or a quorum above the distinct reviewers of that team
    who approved the hash; an approval on expiry holds only while the rule still approves on
    expiry."""
    team = obligations.get("team") or ""
    escalated_from = (request.obligations or {}).get("team") or ""
    team_met = team in ("", request.team) or (
        team == escalated_from and obligations.get("escalation_team") == request.team
    )
    if not team_met:
        return f"the policy now asks the {team} team"
    approved_under = set((request.verdict or {}).get("rules") or [])
    new_rules = [rule for rule in rules if rule not in approved_under]
    if new_rules:
        return f"the policy now asks under rule {', '.join(new_rules)}"
    if request.decided_by == DEADLINE:
        if obligations.get("on_expiry") != "approve":
            return "the policy no longer approves this action on expiry"
        return ""
    quorum = obligations.get("quorum") or 1
    given = len(approvals_of(request, request.approved_hash))
    if given < quorum:
        return f"the policy now asks {quorum} approvals, {given} given"
    return ""
