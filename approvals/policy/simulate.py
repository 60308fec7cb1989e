"""What would this draft do? Replay the stored evaluation inputs of the last N days under a draft
and report, before publishing, how many actions move from allow/ask/deny to which, per tool and
per agent, with example evaluations for each move and the expected reviewer load per day.

Read-only and ledger-free: a simulation writes nothing (no evaluation, no ledger record, no rule
error note) and changes nothing that a later decision depends on.

"Before" is the stored ``PolicyEvaluation.outcome``, what actually happened under the version in
force then. "After" is ``decide_on`` of the stored input under the draft, compiled as version 0,
with what publishing changes and nothing else:

- the stored ``risk`` is dropped: ``decide_on`` recomputes it with the draft's factors;
- the tool's risk metadata comes from the draft where the draft has the tool, as ``build_context``
  takes it from the published snapshot;
- the agent's record, labels, run boundaries and time are the stored ones: they are the action's
  context, not policy.

Grants are audited state, not policy, and ``decide_on`` without a run skips them; the stored
evaluation does not say which check decided. A stored deny that no rule made and that the version
then in force does not reproduce without grants was the grant check's: grants do not change on
publish, so it stays a deny (counted in ``denied_by_grants``).

Memory stays bounded: evaluations are read in id order with ``.iterator()``, and only counts and
at most three example ids per move are kept.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.db.models import Exists, OuterRef
from django.utils import timezone

from approvals.policy.compiled import CompiledPolicy
from approvals.policy.decide import RANK, decide_on
from approvals.policy.models import PolicyEvaluation, PolicyVersion
from approvals.policy.services import draft_problems, draft_snapshot

EXAMPLES = 3
MAX_ERRORS = 20
CHUNK = 500


@dataclass(frozen=True)
class Move:
    before: str
    after: str
    count: int
    examples: list[int]  # PolicyEvaluation ids, at most three, the earliest first

    @property
    def changed(self) -> bool:
        return self.before != self.after


@dataclass(frozen=True)
class SimulationReport:
    days: int
    evaluated: int  # evaluations replayed (errors left out)
    version_before: int | None  # the latest published version, None before the first
    moves: list[Move]  # every (before, after) pair that occurred, unchanged ones included
    by_tool: dict[str, list[Move]]
    by_agent: dict[str, list[Move]]  # "" for runs without an agent
    asks_per_day_before: float
    asks_per_day_after: float
    errors: list[str]  # evaluations that could not be replayed (at most 20 lines, then a total)
    denied_by_grants: int = 0  # stored denies of the grant check, kept as denies

    @property
    def changed(self) -> int:
        return sum(move.count for move in self.moves if move.before != move.after)


@dataclass
class _Tally:
    count: int = 0
    examples: list[int] = field(default_factory=list)

    def add(self, evaluation_id: int) -> None:
        self.count += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(evaluation_id)


def _moves(tallies: dict[tuple[str, str], _Tally]) -> list[Move]:
    def key(pair: tuple[str, str]) -> tuple[int, int, str, str]:
        before, after = pair
        return (RANK.get(before, 9), RANK.get(after, 9), before, after)

    return [
        Move(before, after, tallies[(before, after)].count, list(tallies[(before, after)].examples))
        for before, after in sorted(tallies, key=key)
    ]


def _replayable(data: dict[str, Any], tools: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The stored input as a decision under ``tools`` would see it (the stored one is not
    changed: it may be a cached JSON value)."""
    data = {k: v for k, v in data.items() if k != "risk"}
    name = data["action"]["tool"]
    if name in tools:
        data["tool"] = {"name": name, **tools[name]}
    return data


class _Versions:
    """Published versions compiled on demand, for telling grant denies apart."""

    def __init__(self) -> None:
        self._compiled: dict[int, CompiledPolicy | None] = {}

    def get(self, number: int) -> CompiledPolicy | None:
        if number not in self._compiled:
            if number == 0:
                self._compiled[0] = CompiledPolicy(0, {})
            else:
                row = PolicyVersion.objects.filter(number=number).values("snapshot").first()
                self._compiled[number] = row and CompiledPolicy(number, row["snapshot"])
        return self._compiled[number]


def _denied_by_grant(row: dict[str, Any], data: dict[str, Any], versions: _Versions) -> bool:
    """Whether a stored deny was the grant check's: no rule made it, and the version then in
    force, replayed on the stored input without grants, does not deny."""
    if row["outcome"] != "deny" or row["rules"]:
        return False
    policy = versions.get(row["policy_version"])
    if policy is None:  # the version is gone: nothing tells, take the replay as it is
        return False
    return decide_on(data, policy).outcome != "deny"


def _rows(since, until) -> Iterator[dict[str, Any]]:
    earlier = PolicyEvaluation.objects.filter(
        run_id=OuterRef("run_id"),
        step_seq=OuterRef("step_seq"),
        action_hash=OuterRef("action_hash"),
        created_at__gte=since,
        id__lt=OuterRef("id"),
    )
    return (
        PolicyEvaluation.objects.filter(created_at__gte=since, created_at__lte=until)
        .annotate(repeat=Exists(earlier))
        .order_by("id")
        .values("id", "tool", "agent", "outcome", "rules", "policy_version", "input", "repeat")
        .iterator(chunk_size=CHUNK)
    )


def simulate(
    *, days: int = 7, snapshot: dict[str, Any] | None = None, now=None
) -> SimulationReport:
    """Replay the evaluations of the last ``days`` days under ``snapshot`` (default: the draft).

    Raises ``ValidationError`` for a draft that publishing would refuse (the same problems).
    An evaluation whose stored input cannot be replayed is reported in ``errors``, not raised.

    Asks per day are reviewer load: an action asked again on a later review of the same step
    (a resume re-decides it) counts once, by its first evaluation in the window.
    """
    if days < 1:
        raise ValueError("days must be at least 1")
    snapshot = draft_snapshot() if snapshot is None else snapshot
    problems = draft_problems(snapshot)
    if problems:
        raise ValidationError(problems)
    draft = CompiledPolicy(0, snapshot)
    tools = snapshot.get("tools", {})
    now = now or timezone.now()
    latest = PolicyVersion.objects.order_by("-number").values_list("number", flat=True).first()
    versions = _Versions()

    totals: dict[tuple[str, str], _Tally] = {}
    by_tool: dict[str, dict[tuple[str, str], _Tally]] = {}
    by_agent: dict[str, dict[tuple[str, str], _Tally]] = {}
    evaluated = asks_before = asks_after = by_grants = 0
    errors: list[str] = []
    failed = 0

    for row in _rows(now - timedelta(days=days), now):
        before = row["outcome"]
        try:
            stored = row["input"]
            if _denied_by_grant(row, {k: v for k, v in stored.items() if k != "risk"}, versions):
                after = "deny"
                by_grants += 1
            else:
                after = decide_on(_replayable(stored, tools), draft).outcome
        except Exception as exc:  # a broken stored input is reported, not raised
            failed += 1
            if len(errors) < MAX_ERRORS:
                errors.append(
                    f"evaluation {row['id']} ({row['tool']}): {type(exc).__name__}: {exc}"
                )
            continue
        evaluated += 1
        pair = (before, after)
        for tallies in (
            totals,
            by_tool.setdefault(row["tool"], {}),
            by_agent.setdefault(row["agent"], {}),
        ):
            tallies.setdefault(pair, _Tally()).add(row["id"])
        if not row["repeat"]:
            asks_before += before == "ask"
            asks_after += after == "ask"

    if failed > len(errors):
        errors.append(f"... {failed} evaluations in all could not be replayed")
    return SimulationReport(
        days=days,
        evaluated=evaluated,
        version_before=latest,
        moves=_moves(totals),
        by_tool={tool: _moves(t) for tool, t in sorted(by_tool.items())},
        by_agent={agent: _moves(t) for agent, t in sorted(by_agent.items())},
        asks_per_day_before=asks_before / days,
        asks_per_day_after=asks_after / days,
        errors=errors,
        denied_by_grants=by_grants,
    )
