"""The policy gate: ``settings.BATON_GATE = "approvals.policy.gate.PolicyGate"``.

Every review decides again (the policy or the arguments may have changed while a run waited);
an ask becomes an approval request, and an action executes only on allow, or on an ask whose
approval was given for the same action hash and met the obligations the new decision asks
(``transitions.unmet_obligations``): a stricter re-decision supersedes the approved request and
opens a new one, for the same arguments, carrying the new obligations. Allowed and approved
verdicts carry the canonical arguments to execute. Request statuses change only through
``approvals.queue.transitions``."""

import logging
from dataclasses import replace
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from approvals.policy.decide import Decision, decide
from approvals.policy.models import PolicyEvaluation
from approvals.policy.similar import grant_label, similar_use
from approvals.queue import transitions
from approvals.queue.models import GRANTED, OPEN, ApprovalRequest, RequestKind, RequestStatus
from approvals.queue.transitions import unmet_obligations
from orchestration.canonical import args_diff
from orchestration.gate import Action, Answer, Pending, Question, Verdict
from orchestration.ledger.chain import ledger_append
from orchestration.runs.models import Run, RunStatus

log = logging.getLogger(__name__)


def _verdict(outcome: str, decision: Decision, **extra) -> Verdict:
    return Verdict(
        outcome,
        action_hash=decision.action_hash,
        reason=extra.pop("reason", decision.reason),
        score=decision.score,
        factors=decision.factors,
        rules=decision.rules,
        shadow_rules=decision.shadow_rules,
        policy_version=decision.policy_version,
        obligations=decision.obligations,
        labels=decision.input.get("tool", {}).get("labels_produced"),
        **extra,
    )


def _record(decision: Decision, action: Action, run: Run) -> str:
    """The evaluation with its full input, and its ledger record, in one transaction that locks
    the run first (the lock order: run, then the ledger's head). Returns the run's status then:
    a halt that committed before this decision is seen here, one after it waits for it."""
    with transaction.atomic():
        status = Run.objects.select_for_update().filter(pk=run.pk).values_list("status", flat=True)
        status = next(iter(status), "")
        PolicyEvaluation.objects.create(
            run_id=run.pk,
            step_seq=action.step_seq,
            tool=action.tool,
            agent=decision.agent_name,
            workflow=run.workflow,
            action_hash=decision.action_hash,
            policy_version=decision.policy_version,
            outcome=decision.outcome,
            score=decision.score,
            rules=decision.rules,
            shadow_rules=decision.shadow_rules,
            errors=decision.errors,
            input=decision.input,
        )
        ledger_append(
            f"policy.{decision.outcome}",
            actor="policy-gate",
            run_id=run.pk,
            agent_id=decision.agent_id,
            workflow=run.workflow,
            tool=action.tool,
            outcome=decision.outcome,
            risk=decision.score,
            reason=decision.reason,
            object_type="step",
            object_id=action.step_seq,
            payload={
                "tool": action.tool,
                "action_hash": decision.action_hash,
                "score": decision.score,
                "factors": decision.factors,
                "rules": decision.rules,
                "shadow_rules": decision.shadow_rules,
                "policy_version": decision.policy_version,
                "reason": decision.reason,
            },
        )
        if decision.errors:
            _note_rule_errors(decision.errors)
    return status


def _note_rule_errors(errors: list[dict]) -> None:
    from approvals.policy.models import Rule

    for error in errors:
        Rule.objects.filter(pk=error["rule_id"]).update(
            last_error=error["error"][:2000], last_error_at=timezone.now()
        )


class PolicyGate:
    def review(self, action: Action, *, run_id: int, step_seq: int) -> Verdict:
        run = Run.objects.select_related("agent").get(pk=run_id)
        request = (
            ApprovalRequest.objects.filter(run_id=run_id, step_seq=step_seq, kind="action")
            .exclude(status=RequestStatus.SUPERSEDED)
            .order_by("-id")
            .first()
        )
        if request is not None and request.status == RequestStatus.HALTED:
            return Verdict("halted", reason=request.reason or "halted by a reviewer")
        if request is not None and request.status == RequestStatus.REJECTED:
            return Verdict(
                "rejected",
                action_hash=request.action_hash,
                reason=request.reason or "rejected by a reviewer",
            )
        if request is not None and request.status == RequestStatus.EXPIRED:
            return Verdict(
                "deny", action_hash=request.action_hash, reason="expired without a decision"
            )
        # A reviewer's edit is the action now: decide on it (and execute it, if approved).
        edited = request is not None and request.approved_args is not None
        if edited:
            action = replace(action, args=request.approved_args)
        decision = decide(action, run)
        if _record(decision, action, run) == RunStatus.HALTED:
            return Verdict("halted", reason=f"run {run.pk} was halted")
        try:
            return self._verdict_on(decision, action=action, run=run, request=request)
        except transitions.RunHalted as exc:  # halted while the request was being opened
            return Verdict("halted", reason=str(exc))

    def _verdict_on(
        self, decision: Decision, *, action: Action, run: Run, request: ApprovalRequest | None
    ) -> Verdict:
        edited = request is not None and request.approved_args is not None
        if decision.outcome == "deny":
            return _verdict("deny", decision)
        if decision.outcome == "allow":
            if edited and request.status in OPEN:  # one reviewer's edit, short of its quorum
                return _verdict("pending", decision, reason=_waiting(request))
            if edited:
                return _verdict("approved", decision, args=decision.args, diff=_diff(request))
            return _verdict("allow", decision, args=decision.args)
        if (
            request is not None
            and request.status in GRANTED
            and request.approved_hash == decision.action_hash
        ):
            # The approval holds only for the obligations it met: a stricter re-decision (a new
            # rule asking, another team, a higher quorum) asks again, on a new request for the
            # same arguments.
            unmet = unmet_obligations(
                request, decision.obligations or {}, rules=decision.deciding_rules
            )
            if not unmet:
                return _verdict(
                    "approved",
                    decision,
                    args=decision.args,
                    diff=_diff(request),
                    reason=f"approved by {request.decided_by}",
                )
            renewed = request_renew(request, action=action, run=run, decision=decision, why=unmet)
            return _verdict("pending", decision, reason=f"{unmet}: {_waiting(renewed)}")
        if request is not None and request.status in OPEN:
            if request.action_hash == decision.action_hash:
                return _verdict("pending", decision)
            why = "the action changed while it waited"
            renewed = request_renew(request, action=action, run=run, decision=decision, why=why)
            return _verdict("pending", decision, reason=_waiting(renewed))
        # A reviewer approved a similar action and allowed similar ones: a counted use.
        grant = similar_use(decision, run, step_seq=action.step_seq)
        if grant is not None:
            return _verdict("approved", decision, args=decision.args, reason=grant_label(grant))
        request = request_open(action=action, run=run, decision=decision)
        return _verdict("pending", decision, reason=_waiting(request))

    def ask_human(self, question: Question, *, run_id: int, step_seq: int) -> Answer | Pending:
        request = (
            ApprovalRequest.objects.filter(
                run_id=run_id, step_seq=step_seq, kind=RequestKind.QUESTION
            )
            .order_by("-id")
            .first()
        )
        if request is None:
            run = Run.objects.select_related("agent").get(pk=run_id)
            try:
                with transaction.atomic():
                    transitions.open_request(
                        kind=RequestKind.QUESTION,
                        run_id=run_id,
                        step_seq=step_seq,
                        agent=run.agent.name if run.agent else "",
                        question=question.text,
                        choices=list(question.choices),
                        args=dict(question.context),  # what the answer decides: its subject
                        deadline=timezone.now() + timedelta(hours=24),
                    )
            except (transitions.AlreadyOpen, transitions.RunHalted):  # asked first, or halted
                pass
            return Pending("waiting for an answer")
        if request.status == RequestStatus.APPROVED and request.answer:
            return Answer(choice=request.answer, by=request.decided_by)
        return Pending("waiting for an answer")

    def cancel_run(self, run_id: int, *, by: str, reason: str) -> None:
        """Inside the halt's transaction: every open request of the run closes."""
        transitions.halt_run(run_id, by=by, reason=reason)


def _waiting(request: ApprovalRequest) -> str:
    return f"waiting for {request.team or 'a reviewer'}"


def _diff(request: ApprovalRequest) -> dict | None:
    if request.approved_args is None:
        return None
    return args_diff(request.args, request.approved_args)


def _request_fields(action: Action, run: Run, decision: Decision) -> dict:
    """A request for an ask: the action under review with the decision's obligations, and what
    the approval will be bound to (the verdict's rules, policy version, labels, totals and whose
    data the run read)."""
    obligations = decision.obligations or {}
    return {
        "run_id": run.pk,
        "step_seq": action.step_seq,
        "agent": decision.agent_name,
        "tool": action.tool,
        "args": decision.args,
        "action_hash": decision.action_hash,
        "reasoning": action.reasoning,
        "confidence": action.confidence,
        "verdict": {
            "outcome": "ask",
            "reason": decision.reason,
            "score": decision.score,
            "factors": decision.factors,
            "rules": decision.rules,
            "shadow_rules": decision.shadow_rules,
            "policy_version": decision.policy_version,
            "labels": _labels(decision),
            "totals": (decision.input or {}).get("totals"),
            "data_subjects": ((decision.input or {}).get("run") or {}).get("data_subjects", []),
        },
        "obligations": obligations,
        "team": obligations.get("team", ""),
        "quorum": obligations.get("quorum", 1),
        "deadline": timezone.now() + timedelta(minutes=obligations.get("deadline_minutes", 60)),
        "risk_score": decision.score,
    }


def _labels(decision: Decision) -> list[str]:
    """The data labels the action carried and the run had touched (an "allow similar" grant
    is bound to them)."""
    data = decision.input or {}
    action_labels = (data.get("action") or {}).get("labels") or []
    return sorted(set(action_labels) | set((data.get("run") or {}).get("labels") or []))


def request_open(*, action: Action, run: Run, decision: Decision) -> ApprovalRequest:
    """Open an approval request for an ask (at most one open per step: the constraint)."""
    try:
        with transaction.atomic():
            request = transitions.open_request(
                reason=decision.reason, **_request_fields(action, run, decision)
            )
            _notify_on_commit(request)
    except transitions.AlreadyOpen:  # another worker opened it first
        request = ApprovalRequest.objects.get(
            run_id=run.pk, step_seq=action.step_seq, status__in=OPEN
        )
    return request


def request_renew(
    request: ApprovalRequest, *, action: Action, run: Run, decision: Decision, why: str
) -> ApprovalRequest:
    """Supersede ``request`` and open its successor, in one transaction: the same arguments
    under review (a reviewer's edit stays an edit of the proposal, with its diff and editor),
    the new decision's obligations, and no approvals yet. Another worker that renewed it first
    wins (the open request of the step is returned)."""
    try:
        with transaction.atomic():
            locked = transitions.lock(request.pk)
            transitions.supersede(locked, reason=why, now=timezone.now())
            fields = _request_fields(action, run, decision)
            if locked.approved_args is not None:  # decision.args is the edit, canonical
                fields.update(args=locked.args, approved_args=decision.args)
                fields["edited_by"] = locked.edited_by
            renewed = transitions.open_request(reason=why, supersedes=locked, **fields)
            _notify_on_commit(renewed)
    except (transitions.AlreadyDecided, transitions.AlreadyOpen):  # pending either way; a decision
        # made meanwhile resumes the run and is read on the next review
        opened = ApprovalRequest.objects.filter(
            run_id=run.pk, step_seq=action.step_seq, status__in=OPEN
        )
        renewed = opened.first() or request
    return renewed


def _notify_on_commit(request: ApprovalRequest) -> None:
    if request.risk_score >= settings.BATON_NOTIFY_RISK:
        transaction.on_commit(lambda: _notify(request.pk))


def _notify(request_id: int) -> None:
    from approvals.tasks import notify_request

    try:
        notify_request.delay(request_id)
    except Exception as exc:  # the request is committed; a lost notification is not an error
        log.warning("could not enqueue the notification of request %s: %s", request_id, exc)
