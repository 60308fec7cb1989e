"""A published policy, compiled once per process: CEL programs ready to run and rules indexed by
tool, so a decision's cost does not grow with rules about other tools."""

from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import Any

import cel

from approvals.policy.cel import compile_condition


@dataclass(frozen=True)
class CompiledRule:
    id: int
    name: str
    mode: str
    priority: int
    agents: frozenset[str]
    workflows: frozenset[str]
    tool_patterns: tuple[str, ...]
    condition: str
    program: cel.Program
    outcome: str
    obligations: dict[str, Any]

    def in_scope(self, *, agent: str, workflow: str) -> bool:
        return (not self.agents or agent in self.agents) and (
            not self.workflows or workflow in self.workflows
        )


@dataclass(frozen=True)
class CompiledFactor:
    name: str
    tool_patterns: tuple[str, ...]
    program: cel.Program
    points: int


def matches(patterns: tuple[str, ...], tool: str) -> bool:
    return not patterns or any(fnmatchcase(tool, pattern) for pattern in patterns)


class CompiledPolicy:
    def __init__(self, version: int, snapshot: dict[str, Any]) -> None:
        self.version = version
        self.snapshot = snapshot
        self.thresholds: dict[str, dict[str, int]] = snapshot.get("thresholds", {})
        self.tools: dict[str, dict[str, Any]] = snapshot.get("tools", {})
        self.rules = sorted(
            (
                CompiledRule(
                    id=rule["id"],
                    name=rule["name"],
                    mode=rule["mode"],
                    priority=rule["priority"],
                    agents=frozenset(rule.get("agents") or ()),
                    workflows=frozenset(rule.get("workflows") or ()),
                    tool_patterns=tuple(rule.get("tool_patterns") or ()),
                    condition=rule["condition"],
                    program=compile_condition(rule["condition"]),
                    outcome=rule["outcome"],
                    obligations=rule.get("obligations") or {},
                )
                for rule in snapshot.get("rules", [])
                if rule.get("enabled", True)
            ),
            key=lambda r: (r.priority, r.name),
        )
        self.factors = [
            CompiledFactor(
                name=factor["name"],
                tool_patterns=tuple(factor.get("tool_patterns") or ()),
                program=compile_condition(factor["condition"]),
                points=factor["points"],
            )
            for factor in snapshot.get("factors", [])
            if factor.get("enabled", True)
        ]
        self._by_tool: dict[str, list[CompiledRule]] = {}

    def rules_for(self, tool: str) -> list[CompiledRule]:
        """The rules that can apply to ``tool``, in priority order (computed once per tool)."""
        rules = self._by_tool.get(tool)
        if rules is None:
            rules = [r for r in self.rules if matches(r.tool_patterns, tool)]
            self._by_tool[tool] = rules
        return rules

    def factors_for(self, tool: str) -> list[CompiledFactor]:
        return [f for f in self.factors if matches(f.tool_patterns, tool)]


@lru_cache(maxsize=8)
def _compiled(pk: int, number: int, published_at: str) -> CompiledPolicy:
    from approvals.policy.models import PolicyVersion

    return CompiledPolicy(number, PolicyVersion.objects.get(pk=pk).snapshot)


def current_policy() -> CompiledPolicy:
    """The latest published version, compiled once per process (keyed by its identity, so a
    re-created database never serves a stale compilation)."""
    from approvals.policy.models import PolicyVersion

    latest = PolicyVersion.objects.order_by("-number").values("pk", "number", "published_at")
    row = latest.first()
    if row is None:
        return CompiledPolicy(0, {})
    return _compiled(row["pk"], row["number"], row["published_at"].isoformat())
