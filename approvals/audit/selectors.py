"""Reads for the auditor's pages: the rows of a search page with their links, the state of the
chain's last verification, a decision with its snapshot re-hashed, and a run's replay."""

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.utils import timezone

from approvals.policy.models import PolicyEvaluation
from approvals.queue.models import ApprovalRequest, Decision
from approvals.queue.selectors import risk_band
from orchestration.canonical import CanonicalError, canonical_json, sha256_hex
from orchestration.ledger import last_verification
from orchestration.ledger.models import AuditRecord, LedgerHead
from orchestration.registry.models import Agent
from orchestration.runs import selectors as run_selectors
from orchestration.runs.models import Run
from orchestration.runs.selectors import Entry, compact, pairs, pretty

DECISION_VERBS = ("approval.decided", "approval.answered")


# --- the chain ----------------------------------------------------------------------------


def ledger_status() -> dict[str, Any]:
    """When the chain was last verified and what was found; the head for context."""
    head = LedgerHead.objects.filter(pk=1).first()
    return {"verification": last_verification(), "head_seq": head.seq if head else 0}


# --- search rows --------------------------------------------------------------------------


def decorate_rows(records: list[AuditRecord]) -> list[AuditRecord]:
    """What a row shows and links to, for one page in three queries: the agent's name, the risk
    band, the step of a gate verdict, and the decision of a decision record."""
    agent_ids = {r.agent_id for r in records if r.agent_id}
    agents = dict(Agent.objects.filter(pk__in=agent_ids).values_list("pk", "name"))
    approval_ids = {r.approval_id for r in records if r.approval_id}
    decisions = {
        (request_id, reviewer_id): pk
        for pk, request_id, reviewer_id in Decision.objects.filter(
            request_id__in=approval_ids
        ).values_list("pk", "request_id", "reviewer_id")
    }
    for record in records:
        record.agent_name = agents.get(record.agent_id, "")
        record.band = risk_band(record.risk) if record.risk is not None else ""
        record.step_seq = record.object_id if record.object_type == "step" else ""
        record.decision_id = None
        if record.verb in DECISION_VERBS and record.approval_id:
            record.decision_id = decisions.get((record.approval_id, record.actor_user_id))
    return records


# --- a decision ---------------------------------------------------------------------------


@dataclass
class SnapshotCheck:
    """The snapshot re-hashed and compared with the hash stored beside it and with the hash the
    ledger recorded when the decision was made (the ledger is chained: that copy cannot be
    changed without breaking the chain)."""

    stored: str
    recomputed: str
    ledger: str | None  # None: no ledger record of this decision
    error: str = ""

    @property
    def ok(self) -> bool:
        return (
            not self.error
            and self.recomputed == self.stored
            and (self.ledger is None or self.ledger == self.recomputed)
        )

    @property
    def problems(self) -> list[str]:
        found = []
        if self.error:
            found.append(self.error)
        elif self.recomputed != self.stored:
            found.append("The snapshot does not hash to the hash stored with the decision.")
        if self.ledger is not None and self.ledger != self.recomputed:
            found.append("The snapshot does not hash to the hash the ledger recorded.")
        if self.ledger is None:
            found.append("No ledger record of this decision carries a snapshot hash.")
        return found


def snapshot_check(decision: Decision, records: list[AuditRecord]) -> SnapshotCheck:
    try:
        recomputed = sha256_hex(canonical_json(decision.snapshot))
        error = ""
    except CanonicalError as exc:
        recomputed, error = "", f"The snapshot has no canonical form: {exc}."
    ledger = None
    for record in records:
        if record.verb in DECISION_VERBS and record.actor_user_id == decision.reviewer_id:
            ledger = _payload(record).get("snapshot_hash")
    return SnapshotCheck(decision.snapshot_hash, recomputed, ledger, error)


SNAPSHOT_SHOWN = {
    "request_id",
    "kind",
    "tool",
    "args",
    "summary",
    "question",
    "choices",
    "reasoning",
    "confidence",
    "risk",
    "factors",
    "rules",
    "policy_version",
    "context",
}


def snapshot_view(snapshot: Any) -> dict[str, Any]:
    """The snapshot laid out as the request page laid it out; keys this page does not know are
    listed too, so nothing the reviewer saw is hidden."""
    data = snapshot if isinstance(snapshot, dict) else {"snapshot": snapshot}
    risk = data.get("risk")
    factors = [f for f in data.get("factors") or [] if isinstance(f, dict)]
    return {
        "kind": data.get("kind") or "action",
        "tool": data.get("tool") or "",
        "summary": data.get("summary") or "",
        "args": pairs(data.get("args") or {}),
        "question": data.get("question") or "",
        "choices": [compact(c) for c in data.get("choices") or []],
        "reasoning": data.get("reasoning") or "",
        "confidence": data.get("confidence"),
        "risk": risk if isinstance(risk, int | float) else None,
        "band": risk_band(risk) if isinstance(risk, int | float) else "",
        "factors": factors,
        "rules": [compact(r) for r in data.get("rules") or []],
        "policy_version": data.get("policy_version"),
        "context": pairs(data.get("context") or {}),
        "other": [(key, pretty(value)) for key, value in data.items() if key not in SNAPSHOT_SHOWN],
        "canonical": pretty(data),
    }


def _shown(value: Any) -> str:
    """A value in its canonical text (``80.0`` is ``80``, as the action hash sees it)."""
    if isinstance(value, str):
        return value
    try:
        return canonical_json(value)
    except CanonicalError:
        return compact(value)


def decision_context(decision: Decision) -> dict[str, Any]:
    request = decision.request
    records = list(AuditRecord.objects.filter(approval_id=request.pk).order_by("seq"))
    check = snapshot_check(decision, records)
    own = [
        r.seq
        for r in records
        if r.verb in DECISION_VERBS and r.actor_user_id == decision.reviewer_id
    ]
    diff = [
        (key, _shown(change[0]), _shown(change[1]))
        for key, change in (decision.diff or {}).items()
        if isinstance(change, list | tuple) and len(change) == 2
    ]
    others = list(request.decisions.exclude(pk=decision.pk).select_related("reviewer"))
    return {
        "decision": decision,
        "request": request,
        "snapshot": snapshot_view(decision.snapshot),
        "check": check,
        "records": decorate_rows(records),
        "own_records": own,
        "diff": diff,
        "edited_args": pairs(decision.edited_args) if decision.edited_args else [],
        "others": others,
        "run_exists": Run.objects.filter(pk=request.run_id).exists(),
    }


# --- a run's replay -----------------------------------------------------------------------


@dataclass
class GateView:
    """One evaluation of the gate at a step: from ``PolicyEvaluation`` and its ledger record."""

    outcome: str
    score: int | None
    band: str
    factors: list[dict]
    rules: list[str]
    shadow_rules: list[str]
    policy_version: int | None
    reason: str
    at: datetime | None
    seq: int | None  # the ledger record
    errors: list[dict] = field(default_factory=list)


@dataclass
class RequestView:
    request: ApprovalRequest
    band: str
    decisions: list[Decision]
    records: list[AuditRecord]


@dataclass
class ReplayItem:
    """A line of the replay: a step of the timeline (with its gate verdicts, its requests and
    their decisions, and its other ledger records), an event of the run's log, or a ledger
    record of the run itself."""

    dom_id: str
    at: datetime | None
    entry: Entry | None = None
    step_seq: int | None = None
    gates: list[GateView] = field(default_factory=list)
    requests: list[RequestView] = field(default_factory=list)
    records: list[AuditRecord] = field(default_factory=list)
    record: AuditRecord | None = None

    @property
    def annex(self) -> list[tuple[str, Any]]:
        """The gate's verdicts and the requests (with their decisions) of the step in the order
        they happened: an ask, the request it opened and its decisions, the verdict on resume."""
        timed = [("gate", g.at, g) for g in self.gates] + [
            ("request", r.request.created_at, r) for r in self.requests
        ]
        timed.sort(key=lambda t: (t[1] is None, t[1] or timezone.now()))
        return [(kind, value) for kind, _, value in timed]


def _payload(record: AuditRecord) -> dict[str, Any]:
    try:
        value = json.loads(record.payload)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _step_of(record: AuditRecord, request_steps: dict[int, int]) -> int | None:
    if record.object_type == "step" and record.object_id.isdigit():
        return int(record.object_id)
    if record.approval_id in request_steps:
        return request_steps[record.approval_id]
    step = _payload(record).get("step_seq")
    return step if isinstance(step, int) else None


def _gates(evaluations: list[PolicyEvaluation], records: list[AuditRecord]) -> list[GateView]:
    """Each evaluation beside its ledger record (same transaction: same outcome and hash, in
    order); records without an evaluation row are shown from the ledger alone."""
    verdicts = [r for r in records if r.verb.startswith("policy.")]
    gates = []
    for evaluation in evaluations:
        match = next(
            (
                r
                for r in verdicts
                if r.verb == f"policy.{evaluation.outcome}"
                and _payload(r).get("action_hash") == evaluation.action_hash
            ),
            None,
        )
        if match is not None:
            verdicts.remove(match)
        risk = (evaluation.input or {}).get("risk") or {}
        payload = _payload(match) if match else {}
        gates.append(
            GateView(
                outcome=evaluation.outcome,
                score=evaluation.score,
                band=risk_band(evaluation.score),
                factors=risk.get("factors") or payload.get("factors") or [],
                rules=[compact(r) for r in evaluation.rules],
                shadow_rules=[compact(r) for r in evaluation.shadow_rules],
                policy_version=evaluation.policy_version,
                reason=(match.reason or payload.get("reason", "")) if match else "",
                at=evaluation.created_at,
                seq=match.seq if match else None,
                errors=evaluation.errors or [],
            )
        )
    for record in verdicts:
        payload = _payload(record)
        score = payload.get("score", record.risk)
        gates.append(
            GateView(
                outcome=record.outcome or record.verb.removeprefix("policy."),
                score=score,
                band=risk_band(score) if isinstance(score, int) else "",
                factors=payload.get("factors") or [],
                rules=[compact(r) for r in payload.get("rules") or []],
                shadow_rules=[compact(r) for r in payload.get("shadow_rules") or []],
                policy_version=payload.get("policy_version"),
                reason=record.reason or payload.get("reason", ""),
                at=record.at,
                seq=record.seq,
            )
        )
    gates.sort(key=lambda g: (g.seq is None, g.seq or 0))
    return gates


def _entry_time(entry: Entry) -> datetime | None:
    if entry.event is not None:
        return entry.event.at
    step = entry.step.step
    times = [e.at for e in entry.step.events] + [t for t in (step.started_at,) if t]
    return min(times) if times else None


def run_replay(run_id: int) -> dict[str, Any] | None:
    """The run's timeline with the gate's verdicts and the humans' decisions in place at their
    steps, and the run's own ledger records (created, started, halted...) interleaved by time.
    None if neither the run nor any record of it exists."""
    run = run_selectors.run_get(run_id)
    records = list(AuditRecord.objects.filter(run_id=run_id).order_by("seq"))
    if run is None and not records:
        return None
    requests = list(ApprovalRequest.objects.filter(run_id=run_id).order_by("id"))
    request_steps = {r.pk: r.step_seq for r in requests}
    decisions: dict[int, list[Decision]] = {}
    for decision in Decision.objects.filter(request__run_id=run_id).select_related("reviewer"):
        decisions.setdefault(decision.request_id, []).append(decision)
    evaluations: dict[int, list[PolicyEvaluation]] = {}
    for evaluation in PolicyEvaluation.objects.filter(run_id=run_id).order_by("id"):
        evaluations.setdefault(evaluation.step_seq, []).append(evaluation)

    by_step: dict[int, list[AuditRecord]] = {}
    run_level: list[AuditRecord] = []
    for record in decorate_rows(records):
        step = _step_of(record, request_steps)
        if step is None:
            run_level.append(record)
        else:
            by_step.setdefault(step, []).append(record)

    def step_item(seq: int, entry: Entry | None, at: datetime | None) -> ReplayItem:
        step_records = by_step.pop(seq, [])
        by_request: dict[int, list[AuditRecord]] = {}
        others = []
        for record in step_records:
            if record.approval_id in request_steps:
                by_request.setdefault(record.approval_id, []).append(record)
            elif not record.verb.startswith("policy."):
                others.append(record)
        return ReplayItem(
            dom_id=f"step-{seq}",
            at=at,
            entry=entry,
            step_seq=seq,
            gates=_gates(evaluations.pop(seq, []), step_records),
            requests=[
                RequestView(
                    r, risk_band(r.risk_score), decisions.get(r.pk, []), by_request.get(r.pk, [])
                )
                for r in requests
                if r.step_seq == seq
            ],
            records=others,
        )

    items: list[ReplayItem] = []
    last = None
    for entry in run_selectors.run_timeline(run) if run else []:
        at = _entry_time(entry) or last
        last = at or last
        if entry.event is not None:
            items.append(ReplayItem(dom_id=entry.dom_id, at=at, entry=entry))
        else:
            items.append(step_item(entry.step.step.seq, entry, at))
    # Steps the run no longer has rows for (or never recorded), known from the ledger
    for seq in sorted(set(by_step) | set(evaluations)):
        first = (by_step.get(seq) or [None])[0]
        items.append(step_item(seq, None, first.at if first else None))
    _merge(items, run_level)
    return {
        "run": run,
        "run_id": run_id,
        "facts": run_selectors.run_facts(run) if run else {},
        "items": items,
        "records": len(records),
        "requests": len(requests),
        "decisions": sum(len(d) for d in decisions.values()),
        "now": timezone.now(),
    }


def _merge(items: list[ReplayItem], run_level: list[AuditRecord]) -> None:
    """Place the run's own records among the timeline's items by time, keeping the timeline's
    order (a record goes before the first item that happened after it)."""
    for record in run_level:
        position = len(items)
        for index, item in enumerate(items):
            if item.at is not None and item.at > record.at:
                position = index
                break
        items.insert(
            position, ReplayItem(dom_id=f"record-{record.seq}", at=record.at, record=record)
        )
