from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Any, Literal, Protocol

from django.conf import settings
from django.utils.module_loading import import_string

from orchestration.canonical import action_hash

Outcome = Literal["allow", "deny", "pending", "approved", "rejected", "halted"]


@dataclass(frozen=True)
class Action:
    """What an agent wants to do. ``hash`` identifies the tool and its canonical arguments, so
    an approval applies only to exactly what the reviewer saw. ``args`` are canonical (the
    engine canonicalises them once). ``agent`` is the agent acting, whose rights apply: inside
    ``ctx.agent`` that loop's agent, else the run's; None for a workflow acting without one."""

    tool: str
    args: dict[str, Any]
    run_id: int
    step_seq: int
    agent: str | None = None
    reasoning: str = ""
    confidence: float | None = None
    labels: tuple[str, ...] = ()

    @property
    def hash(self) -> str:
        return action_hash(self.tool, self.args)

    def to_record(self) -> dict[str, Any]:
        return {**asdict(self), "labels": list(self.labels), "hash": self.hash}


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    action_hash: str = ""
    reason: str = ""
    args: dict[str, Any] | None = None  # the arguments decided on, which execute (maybe edited)
    diff: dict[str, Any] | None = None  # approved after an edit: what changed
    score: int | None = None
    factors: list[dict[str, Any]] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    shadow_rules: list[str] = field(default_factory=list)  # matched, recorded, never decisive
    policy_version: int | None = None
    obligations: dict[str, Any] | None = None
    # The labels the tool's result carries as the deciding policy knows the tool (an admin may
    # have changed its declaration); None: the tool's declaration in code.
    labels: list[str] | None = None

    def to_record(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Question:
    text: str
    choices: tuple[str, ...] = ()
    context: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Answer:
    choice: str
    by: str
    comment: str = ""


@dataclass(frozen=True)
class Pending:
    reason: str = "waiting for a reviewer"


class Gate(Protocol):
    def review(self, action: Action, *, run_id: int, step_seq: int) -> Verdict:
        """Idempotent per (run_id, step_seq)."""
        ...

    def ask_human(self, question: Question, *, run_id: int, step_seq: int) -> Answer | Pending: ...

    def cancel_run(self, run_id: int, *, by: str, reason: str) -> None: ...


class AllowAllGate:
    """Allows every action and answers every question with its first choice. For the engine's
    own tests and the demo until a policy gate is configured."""

    def review(self, action: Action, *, run_id: int, step_seq: int) -> Verdict:
        return Verdict("allow", action_hash=action.hash, reason="allow-all gate")

    def ask_human(self, question: Question, *, run_id: int, step_seq: int) -> Answer | Pending:
        choice = question.choices[0] if question.choices else "yes"
        return Answer(choice=choice, by="allow-all gate")

    def cancel_run(self, run_id: int, *, by: str, reason: str) -> None:
        return None


@cache
def _gate_class(path: str) -> type:
    return import_string(path)


def get_gate() -> Gate:
    return _gate_class(settings.BATON_GATE)()
