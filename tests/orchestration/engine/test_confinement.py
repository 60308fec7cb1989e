"""Every action is confined to the agent acting: a model gets only the tools it was offered, a
nested agent acts with its own rights, a run without an agent only with what its workflow
declares; and exactly the canonical arguments the gate decided on execute."""

import pytest

from orchestration.engine.errors import InvalidArguments, StepFailed
from orchestration.gate import Verdict
from orchestration.providers import ProviderError
from orchestration.registry.declare import tool, workflow
from orchestration.registry.models import Agent, Tool
from orchestration.runs.models import Step
from orchestration.runs.services import run_resume, run_start
from tests.orchestration.engine.conftest import drive
from tests.orchestration.engine.puppet import Turn

pytestmark = pytest.mark.django_db(transaction=True)

DONE: list[tuple[str, dict]] = []
LABEL = {
    "type": "object",
    "properties": {"label": {"type": "string"}},
    "required": ["label"],
    "additionalProperties": False,
}


@tool("confine.read", side_effect="read", schema=LABEL)
def read(*, label: str, idempotency_key: str) -> dict:
    """Read something."""
    DONE.append(("confine.read", {"label": label}))
    return {"read": label}


@tool("confine.write", side_effect="write", schema=LABEL)
def write(*, label: str, idempotency_key: str) -> dict:
    """Change something."""
    DONE.append(("confine.write", {"label": label}))
    return {"wrote": label}


@tool("confine.other", side_effect="read", schema=LABEL)
def other(*, label: str, idempotency_key: str) -> dict:
    """Something no run here declares."""
    DONE.append(("confine.other", {"label": label}))
    return {}


@workflow("confine.loop", tools=["confine.read"])
def loop(ctx, agent: str = "loopy") -> dict:
    """No agent; its loop may use only what the workflow declares."""
    return {"answer": ctx.agent(agent, goal="do it", tools=["confine.read", "confine.write"])}


@workflow("confine.nested")
def nested(ctx) -> dict:
    """Run by one agent; another acts inside; then the run's agent acts again."""
    try:
        answer = ctx.agent("inner", goal="do it")
    except StepFailed as failed:  # a model that failed for good: the loop ends by an exception
        answer = str(failed)
    after = ctx.tool("confine.write", label="after the loop")
    return {"answer": answer, "after": after}


@workflow("confine.direct", tools=["confine.read", "confine.write"])
def direct(ctx, name: str = "confine.other", label: str = "x") -> dict:
    try:
        return ctx.tool(name, label=label)
    except InvalidArguments as refused:
        return {"refused": type(refused).__name__, "why": str(refused)}


@workflow("confine.nan", tools=["confine.write"])
def nan(ctx) -> dict:
    try:
        return ctx.tool("confine.write", label=float("nan"))
    except InvalidArguments as refused:
        return {"refused": type(refused).__name__, "why": str(refused)}


@workflow("confine.undeclared")
def undeclared(ctx) -> dict:
    return ctx.tool("confine.read", label="x")


@workflow("confine.handoff", tools=["confine.read"])
def handing_off(ctx) -> dict:
    return ctx.handoff("inner", goal="read: label: x")


@pytest.fixture(autouse=True)
def _tools():
    DONE.clear()
    for name in ("confine.read", "confine.write", "confine.other"):
        Tool.objects.get_or_create(name=name, defaults={"side_effect": "read"})


def agent(name: str, *tools: str) -> Agent:
    made = Agent.objects.create(name=name, provider="puppet", model="puppet-1")
    made.tools.set(Tool.objects.filter(name__in=tools))
    return made


def observations(run) -> list[str]:
    """What the model was told after each of its tool calls."""
    last = run.step_set.filter(kind="llm").order_by("-seq").first()
    return [m["content"] for m in last.input["messages"] if m["role"] == "tool"]


def test_a_tool_the_model_was_not_offered_is_refused_before_the_gate(gate, puppet):
    agent("loopy", "confine.read", "confine.write", "confine.other")
    puppet.turns = [
        Turn(calls=[("confine.write", {"label": "a"})]),  # in the ceiling, not declared
        Turn(calls=[("confine.other", {"label": "b"})]),  # in the ceiling, never offered
        Turn(calls=[("Payments.Refund", {"amount": 5})]),  # no such tool
        Turn(calls=[("confine.read", {"label": "c"})]),
        Turn(text="All done."),
    ]
    run = drive(run_start(workflow="confine.loop", input={}).pk)
    assert run.status == "completed", run.error
    assert run.result == {"answer": "All done."}
    assert puppet.offered[0] == ["confine.read"]  # declared by the workflow, in the ceiling
    assert DONE == [("confine.read", {"label": "c"})]
    assert [(a.tool, a.agent) for a in gate.reviewed] == [("confine.read", "loopy")]
    refused = run.step_set.filter(kind="tool", error_type="ToolUnavailable").order_by("seq")
    assert [(s.name, s.status, s.verdict) for s in refused] == [
        ("confine.write", "failed", None),
        ("confine.other", "failed", None),
        ("Payments.Refund", "failed", None),
    ]
    told = observations(run)
    assert told[0] == ('{"error":"tool \'confine.write\' was not offered (offered: confine.read)"}')
    assert "tool 'Payments.Refund' was not offered" in told[2]


def test_a_run_without_an_agent_uses_only_what_its_workflow_declares(gate):
    run = drive(run_start(workflow="confine.direct", input={"name": "confine.other"}).pk)
    assert run.result == {
        "refused": "ToolUnavailable",
        "why": "tool confine.other is not available to this run",
    }
    assert DONE == [] and gate.reviewed == []
    run = drive(run_start(workflow="confine.undeclared", input={}).pk)
    assert run.status == "failed"
    assert run.error == "ToolUnavailable: tool confine.read is not available to this run"


def test_an_unknown_tool_in_workflow_code_is_a_programming_error(gate):
    run = drive(run_start(workflow="confine.direct", input={"name": "confine.nope"}).pk)
    assert run.status == "failed"
    assert run.error == "No tool named 'confine.nope' is registered."


def test_a_nested_agent_acts_with_its_own_rights_within_the_run_s(gate, puppet):
    outer = agent("outer", "confine.read", "confine.write")
    agent("inner", "confine.read", "confine.other")
    puppet.turns = [
        Turn(calls=[("confine.write", {"label": "outer's right, not inner's"})]),
        Turn(calls=[("confine.other", {"label": "inner's right, not the run's"})]),
        Turn(calls=[("confine.read", {"label": "both"})]),
    ]
    gate.verdicts["confine.read"] = Verdict("pending")
    run = drive(run_start(workflow="confine.nested", input={}, agent=outer).pk)
    assert run.status == "waiting"
    assert puppet.offered == [["confine.read"]] * 3
    assert [(a.tool, a.agent) for a in gate.reviewed] == [("confine.read", "inner")]

    gate.verdicts["confine.read"] = Verdict("allow")
    run_resume(run_id=run.pk)
    run = drive(run.pk)  # replays the loop: still inner inside it, outer after it
    assert run.status == "completed", run.error
    assert [(a.tool, a.agent) for a in gate.reviewed] == [
        ("confine.read", "inner"),
        ("confine.read", "inner"),
        ("confine.write", "outer"),
    ]
    assert DONE == [
        ("confine.read", {"label": "both"}),
        ("confine.write", {"label": "after the loop"}),
    ]
    steps = run.step_set.filter(kind="tool").order_by("seq")
    assert [(s.name, s.error_type, s.input["agent"]) for s in steps] == [
        ("confine.write", "ToolUnavailable", "inner"),
        ("confine.other", "ToolUnavailable", "inner"),
        ("confine.read", "", "inner"),
        ("confine.write", "", "outer"),
    ]


def test_the_run_s_agent_acts_again_after_a_loop_that_failed(gate, puppet, monkeypatch):
    outer = agent("outer", "confine.read", "confine.write")
    agent("inner", "confine.read")

    def broken(self, **kwargs):
        raise ProviderError("the model is gone", retryable=False, status=400)

    monkeypatch.setattr(puppet, "complete", broken)
    run = drive(run_start(workflow="confine.nested", input={}, agent=outer).pk)
    assert run.status == "completed", run.error
    assert "the model is gone" in run.result["answer"]
    assert [(a.tool, a.agent) for a in gate.reviewed] == [("confine.write", "outer")]


def test_a_handoff_from_a_run_without_an_agent_gets_what_the_workflow_declares(gate, puppet):
    agent("inner", "confine.read", "confine.write")
    parent = drive(run_start(workflow="confine.handoff", input={}).pk)
    assert parent.children.get().allowed_tools == ["confine.read"]


def test_the_gate_decides_on_and_the_tool_executes_the_canonical_arguments(gate):
    raw = "  Cafe\u0301 au lait \n"
    run = run_start(workflow="confine.direct", input={"name": "confine.write", "label": raw})
    run = drive(run.pk)
    assert run.status == "completed", run.error
    assert gate.reviewed[0].args == {"label": "Caf\u00e9 au lait"}
    assert run.step_set.get().input["args"] == {"label": "Caf\u00e9 au lait"}
    assert DONE == [("confine.write", {"label": "Caf\u00e9 au lait"})]


def test_an_allow_carrying_arguments_executes_those_and_they_are_checked(gate):
    gate.verdicts["confine.write"] = Verdict("allow", args={"label": "as decided"})
    drive(run_start(workflow="confine.direct", input={"name": "confine.write"}).pk)
    assert DONE == [("confine.write", {"label": "as decided"})]

    DONE.clear()
    gate.verdicts["confine.write"] = Verdict("approved", args={"label": 7})
    run = drive(run_start(workflow="confine.direct", input={"name": "confine.write"}).pk)
    assert run.result == {
        "refused": "InvalidArguments",
        "why": "confine.write label: 7 is not of type 'string'",
    }
    assert DONE == []


def test_arguments_without_a_canonical_form_are_refused_and_never_recorded(gate, puppet):
    run = drive(run_start(workflow="confine.nan", input={}).pk)
    assert run.result == {
        "refused": "InvalidArguments",
        "why": "confine.write: args.label is not a finite number",
    }
    agent("loopy", "confine.read")
    puppet.turns = [Turn(calls=[("confine.read", ["not", "an", "object"])])]
    run = drive(run_start(workflow="confine.loop", input={}).pk)
    assert run.status == "completed", run.error
    assert "confine.read: arguments must be an object" in observations(run)[0]
    steps = Step.objects.filter(kind="tool").order_by("run_id", "seq")
    assert [(s.error_type, s.input["args"]) for s in steps] == [
        ("InvalidArguments", None),
        ("InvalidArguments", None),
    ]
    assert DONE == [] and gate.reviewed == []
