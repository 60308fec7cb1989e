"""The approval services reviewers call (views, consumers, tasks): claim, release, decide, and
the beat's claim expiry. Each opens one durable transaction, checks who may act
(``approvals.access``, separation of duties) and applies one transition of
``approvals.queue.transitions``, which locks, checks the state and writes the ledger record;
the run resumes and the queue is told after commit.

A decision carries the action hash the reviewer was shown (``shown_hash``): a decision on
arguments no longer under review (another reviewer edited them meanwhile) is refused with
``StaleReview``. Quorum counts distinct reviewers approving the same hash; an edit makes a new
hash and restarts the count. Whoever started the run, and the agent's owner, cannot approve
their own request."""

from contextlib import suppress
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from approvals.access import check_separation_of_duties, check_team
from approvals.queue import transitions
from approvals.queue.models import GRANTED, ApprovalRequest, RequestStatus
from orchestration.canonical import canonical_args
from orchestration.registry.declare import get_tool
from orchestration.runs.models import Run
from orchestration.runs.services import (
    RunError,
    halt_within_transaction,
    resume_within_transaction,
)

VERDICTS = {"approve", "edit", "reject", "halt", "answer"}
SIMILAR_SCOPES = {"run", "hour"}
SIMILAR_HOUR = timedelta(hours=1)
SIMILAR_MAX_USES = 10


def _pk(request: ApprovalRequest | int) -> int:
    return request if isinstance(request, int) else request.pk


def approval_claim(*, request: ApprovalRequest | int, reviewer) -> ApprovalRequest:
    """Claim an open request for a while (``BATON_CLAIM_SECONDS``); another reviewer's live
    claim is a conflict. Claiming again renews it."""
    with transaction.atomic(durable=True):
        locked = transitions.lock(_pk(request))
        check_team(locked, reviewer)
        now = timezone.now()
        until = now + timedelta(seconds=settings.BATON_CLAIM_SECONDS)
        transitions.claim(locked, reviewer=reviewer, until=until, now=now)
    return locked


def approval_release(*, request: ApprovalRequest | int, reviewer) -> ApprovalRequest:
    with transaction.atomic(durable=True):
        locked = transitions.lock(_pk(request))
        transitions.release(locked, reviewer=reviewer)
    return locked


def claims_expire(*, now=None) -> int:
    """Beat: idle claims lapse, so a request cannot stay stuck with an absent reviewer."""
    now = now or timezone.now()
    due = ApprovalRequest.objects.filter(claim_expires_at__lte=now, claimed_by__isnull=False)
    released = 0
    for request_id in list(due.values_list("pk", flat=True)):
        with transaction.atomic(durable=True):
            released += transitions.release_expired(transitions.lock(request_id), now=now)
    return released


def approval_decide(
    *,
    request: ApprovalRequest | int,
    reviewer,
    verdict: str,
    shown_hash: str | None = None,
    args: dict[str, Any] | None = None,
    comment: str = "",
    answer: str = "",
    allow_similar: str | None = None,
) -> ApprovalRequest:
    """Record one reviewer's decision on the arguments they were shown: ``shown_hash``, the
    action hash the request page showed them (None: whatever is under review when this runs,
    for callers that read and decide at once). ``allow_similar`` ("run" or "hour"), with an
    approval that decides the request and where the rule permits it, also grants the agent
    similar actions (the same tool, within the approved arguments) for the run or for an
    hour."""
    if verdict not in VERDICTS:
        raise ValidationError(f"Unknown verdict {verdict!r}.")
    if allow_similar is not None:
        if allow_similar not in SIMILAR_SCOPES:
            raise ValidationError({"allow_similar": "Allow similar for the run or for 1 hour."})
        if verdict not in {"approve", "edit"}:
            raise ValidationError({"allow_similar": "Only an approval can allow similar actions."})
    if verdict in {"reject", "halt"} and not comment.strip():
        raise ValidationError({"comment": "A reason is required."})
    with transaction.atomic(durable=True):
        locked = transitions.lock(_pk(request))
        check_team(locked, reviewer)
        if verdict in {"approve", "edit", "answer"}:
            check_separation_of_duties(locked, reviewer)
        now = timezone.now()
        decided = {"reviewer": reviewer, "shown_hash": shown_hash, "now": now}
        also = None
        if allow_similar is not None:

            def also(approved: ApprovalRequest) -> dict[str, Any]:
                grant = _allow_similar(approved, allow_similar, reviewer, now)
                return {"allow_similar": {"scope": allow_similar, "grant": grant.pk}}

        if verdict == "approve":
            transitions.approve(locked, comment=comment, also=also, **decided)
        elif verdict == "edit":
            edited = canonical_args(_validated(locked.tool, args or {}))
            transitions.edit(locked, args=edited, comment=comment, also=also, **decided)
        elif verdict == "reject":
            transitions.reject(locked, reason=comment, **decided)
        elif verdict == "answer":
            transitions.answer(locked, answer=answer, **decided)
        else:
            transitions.halt_decision(locked, reason=comment, **decided)
            with suppress(RunError):  # a run already final: its requests still close
                halt_within_transaction(run_id=locked.run_id, by=reviewer, reason=comment)
            transitions.halt_run(locked.run_id, by=reviewer, reason=comment)
        if locked.status in {*GRANTED, RequestStatus.REJECTED}:
            resume_within_transaction(
                run_id=locked.run_id, note=f"{locked.decided_by} decided: {verdict}"
            )
    locked.refresh_from_db()
    return locked


def _allow_similar(locked: ApprovalRequest, scope: str, reviewer, now):
    """Inside the decision's transaction: the reviewer's grant for similar actions, recorded
    with the decision's ledger record."""
    from approvals.policy.services import grant_create
    from approvals.policy.similar import REVIEWER, similar_condition
    from orchestration.registry.models import Agent, Tool

    if not (locked.obligations or {}).get("allow_similar"):
        raise ValidationError({"allow_similar": "The rule does not permit allowing similar."})
    if Tool.objects.filter(name=locked.tool, allow_similar_forbidden=True).exists():
        raise ValidationError({"allow_similar": f"Admins forbid allowing similar {locked.tool}."})
    if locked.status not in GRANTED:
        raise ValidationError(
            {"allow_similar": f"Only the approval that decides (quorum {locked.quorum}) can."}
        )
    run = Run.objects.select_related("agent").get(pk=locked.run_id)
    # The grant is the acting agent's (a nested loop's agent, not the run's).
    agent = Agent.objects.filter(name=locked.agent).first() if locked.agent else None
    if agent is None:
        raise ValidationError({"allow_similar": "No agent proposed this action."})
    approved = locked.args_under_review
    return grant_create(
        agent=agent,
        tool_pattern=locked.tool,
        by=reviewer,
        condition=similar_condition(
            approved,
            labels=locked.verdict.get("labels", []),
            score=locked.risk_score,
            totals=locked.verdict.get("totals"),
            data_subjects=locked.verdict.get("data_subjects"),
        ),
        run_id=run.pk if scope == "run" else None,
        expires_at=now + SIMILAR_HOUR if scope == "hour" else None,
        max_uses=SIMILAR_MAX_USES,
        source=REVIEWER,
        request=locked,
    )


def _validated(tool: str, args: dict[str, Any]) -> dict[str, Any]:
    definition = get_tool(tool)
    errors = sorted(definition.validator.iter_errors(args), key=lambda e: list(e.path))
    if errors:
        raise ValidationError(
            {"/".join(str(p) for p in e.absolute_path) or "args": e.message for e in errors}
        )
    return args
