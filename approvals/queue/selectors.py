"""Reads for the queue pages and their live fragments: the reviewer's open requests, filtered and
sorted by deadline then risk, each with a one-line summary of the arguments under review, a risk
band and its approvals so far; and the snapshot of exactly what a request page shows (hashed
into each decision)."""

from dataclasses import dataclass
from typing import Any

from django.db.models import Prefetch, QuerySet
from django.utils import timezone
from django.utils.http import urlencode

from approvals.access import has_role, visible_to
from approvals.queue.models import APPROVALS, OPEN, ApprovalRequest, Decision, RequestKind
from approvals.roles import REVIEW
from orchestration.canonical import args_diff
from orchestration.registry.declare import RegistryError, get_tool

BANDS = (("low", 0, 39), ("medium", 40, 69), ("high", 70, 100))
SUMMARY_LENGTH = 120


def can_review(user) -> bool:
    return has_role(user, REVIEW)


def band_range(band: str) -> tuple[int, int]:
    """The lowest and highest risk score of a band (``low``, ``medium``, ``high``)."""
    _, low, high = next(b for b in BANDS if b[0] == band)
    return low, high


def risk_band(score: int | None) -> str:
    score = score or 0
    for name, low, high in BANDS:
        if low <= score <= high:
            return name
    return "high"


def _value(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:39] + "…"


def _ordered(tool: str, args: dict) -> list[str]:
    """The tool's schema order (identifiers come first there), then any other keys."""
    try:
        declared = list((get_tool(tool).schema or {}).get("properties") or {})
    except RegistryError:
        declared = []
    return [k for k in declared if k in args] + [k for k in args if k not in declared]


def summary(request: ApprovalRequest) -> str:
    """One line a human reads: ``payments.refund: order_id A-1004, amount 1899`` (the
    arguments under review: after an edit, the edited ones)."""
    if request.kind == RequestKind.QUESTION:
        line = request.question
    else:
        values = request.args_under_review or {}
        args = ", ".join(f"{k} {_value(values[k])}" for k in _ordered(request.tool, values))
        line = f"{request.tool}: {args}" if args else request.tool
    return line if len(line) <= SUMMARY_LENGTH else line[: SUMMARY_LENGTH - 1] + "…"


@dataclass(frozen=True)
class QueueFilters:
    agent: str = ""
    tool: str = ""
    risk: str = ""  # low, medium, high
    team: str = ""
    claim: str = ""  # mine, unclaimed

    @classmethod
    def from_query(cls, query) -> "QueueFilters":
        risk, claim = query.get("risk", ""), query.get("claim", "")
        return cls(
            agent=query.get("agent", "")[:80],
            tool=query.get("tool", "")[:120],
            risk=risk if risk in {b[0] for b in BANDS} else "",
            team=query.get("team", "")[:80],
            claim=claim if claim in {"mine", "unclaimed"} else "",
        )

    def querystring(self) -> str:
        pairs = {k: v for k, v in self.__dict__.items() if v}
        return urlencode(pairs)

    @property
    def active(self) -> bool:
        return any(self.__dict__.values())


APPROVALS_GIVEN = Prefetch(
    "decisions",
    queryset=Decision.objects.filter(verdict__in=APPROVALS).select_related("reviewer"),
    to_attr="approval_decisions",
)


def open_requests(user) -> QuerySet[ApprovalRequest]:
    return (
        visible_to(user)
        .filter(status__in=OPEN)
        .select_related("claimed_by")
        .prefetch_related(APPROVALS_GIVEN)
        .order_by("deadline", "-risk_score", "id")
    )


def approvers(request: ApprovalRequest) -> list[str]:
    """Who approved the hash now under review (an edit restarts the count) under the request's
    current team (an escalation restarts it too), in order: ``transitions.approvals_of``."""
    decisions = getattr(request, "approval_decisions", None)
    if decisions is None:
        decisions = request.decisions.filter(verdict__in=APPROVALS).select_related("reviewer")
    return [
        d.reviewer.get_username()
        for d in decisions
        if d.action_hash == request.action_hash and d.team == request.team
    ]


def pending_edit(request: ApprovalRequest) -> dict[str, Any] | None:
    """A reviewer's edit under review: who made it and what it changed from the proposal."""
    if request.approved_args is None:
        return None
    return {"by": request.edited_by, "diff": args_diff(request.args, request.approved_args)}


def _claim_live(request: ApprovalRequest, now) -> bool:
    return bool(
        request.claimed_by_id and request.claim_expires_at and request.claim_expires_at > now
    )


def decorate(request: ApprovalRequest, user=None, now=None) -> ApprovalRequest:
    now = now or timezone.now()
    request.summary = summary(request)
    request.band = risk_band(request.risk_score)
    request.holder = request.claimed_by.get_username() if _claim_live(request, now) else ""
    request.mine = bool(user and request.holder and request.claimed_by_id == user.pk)
    request.overdue = bool(request.deadline and request.deadline <= now)
    request.approvers = approvers(request) if request.kind == RequestKind.ACTION else []
    request.edit = pending_edit(request)
    return request


def queue_rows(user, filters: QueueFilters) -> list[ApprovalRequest]:
    requests = open_requests(user)
    if filters.agent:
        requests = requests.filter(agent=filters.agent)
    if filters.tool:
        requests = requests.filter(tool=filters.tool)
    if filters.team:
        requests = requests.filter(team=filters.team)
    if filters.risk:
        low, high = band_range(filters.risk)
        requests = requests.filter(risk_score__gte=low, risk_score__lte=high)
    now = timezone.now()
    rows = [decorate(r, user, now) for r in requests]
    if filters.claim == "mine":
        rows = [r for r in rows if r.mine]
    elif filters.claim == "unclaimed":
        rows = [r for r in rows if not r.holder]
    return rows


def queue_counts(user, rows: list[ApprovalRequest]) -> dict[str, int]:
    everything = [decorate(r, user) for r in open_requests(user)]
    return {
        "shown": len(rows),
        "open": len(everything),
        "mine": sum(1 for r in everything if r.mine),
        "unclaimed": sum(1 for r in everything if not r.holder),
        "high": sum(1 for r in everything if r.band == "high"),
        "questions": sum(1 for r in everything if r.kind == RequestKind.QUESTION),
    }


def filter_choices(user) -> dict[str, list[str]]:
    requests = open_requests(user)
    return {
        "agents": sorted({a for a in requests.values_list("agent", flat=True) if a}),
        "tools": sorted({t for t in requests.values_list("tool", flat=True) if t}),
        "teams": sorted(set(user.reviewer_teams.values_list("name", flat=True))),
        "bands": [b[0] for b in BANDS],
    }


def request_snapshot(request: ApprovalRequest) -> dict[str, Any]:
    """Exactly what the request page shows a reviewer deciding: the arguments under review and
    their hash (an approval approves exactly these), the edit that made them and the approvals
    they have so far."""
    verdict = request.verdict or {}
    edit = pending_edit(request)
    return {
        "request_id": request.pk,
        "kind": request.kind,
        "tool": request.tool,
        "args": request.args_under_review,
        "action_hash": request.action_hash,
        **({"proposed_args": request.args, "edit": edit} if edit else {}),
        "team": request.team,
        "quorum": request.quorum,
        "approvals": approvers(request) if request.kind == RequestKind.ACTION else [],
        "summary": summary(request),
        "question": request.question,
        "choices": request.choices,
        "reasoning": request.reasoning,
        "confidence": request.confidence,
        "risk": request.risk_score,
        "factors": verdict.get("factors") or [],
        "rules": verdict.get("rules") or [],
        "policy_version": verdict.get("policy_version"),
    }


def related_open(request: ApprovalRequest, user) -> list[ApprovalRequest]:
    others = open_requests(user).filter(run_id=request.run_id).exclude(pk=request.pk)
    return [decorate(r, user) for r in others]
