"""A model's or a tool's NaN, infinity or NUL never makes a poison run: nothing without a
canonical JSON form is recorded (the step fails, not retried, saying why), and whatever the
database refuses in a run's last writes, the run still ends failed instead of staying running
for the sweep to replay forever. Run on SQLite and on PostgreSQL (``DATABASE_URL``), whose JSON
refuses what SQLite's may not."""

import math

import pytest

from orchestration.engine.errors import StepFailed
from orchestration.engine.runner import run_advance
from orchestration.registry.declare import tool, workflow
from orchestration.registry.models import Agent, Tool
from orchestration.runs.models import Run
from orchestration.runs.services import run_start
from tests.orchestration.engine.conftest import drive
from tests.orchestration.engine.puppet import Turn

pytestmark = pytest.mark.django_db(transaction=True)

DECISION = {"type": "object", "properties": {"amount": {"type": "number"}}}


@tool("poison.measure", side_effect="read", schema={"type": "object"})
def measure(*, idempotency_key: str) -> dict:
    """A tool whose answer has no JSON form."""
    return {"ratio": math.inf}


@workflow("poison.decide")
def decide(ctx) -> dict:
    return ctx.llm(
        [{"role": "user", "content": "How much?"}], output_schema=DECISION, provider="puppet"
    )


@workflow("poison.agent")
def agent_loop(ctx) -> dict:
    return {"answer": ctx.agent("poisoner", goal="measure")}


@workflow("poison.measure", tools=["poison.measure"])
def measures(ctx) -> dict:
    try:
        return ctx.tool("poison.measure")
    except StepFailed as failed:
        return {"caught": str(failed)}


def settled(run: Run) -> Run:
    """Final, unleased, and nothing left for a worker or the sweep to do."""
    assert run.is_final and run.lease_owner == ""
    assert run_advance(run.pk) == "skipped"
    return run


def test_a_nan_in_a_model_s_parsed_output_fails_the_run_once(gate, puppet):
    puppet.turns = [Turn(text='{"amount": NaN}', parsed={"amount": math.nan})]
    run = settled(drive(run_start(workflow="poison.decide", input={}).pk))
    assert run.status == "failed"
    assert run.error == (
        "StepFailed: NonRetryable: the result cannot be recorded: "
        "result.parsed.amount is not a finite number"
    )
    step = run.step_set.get()
    assert (step.status, step.attempt, step.output) == ("failed", 1, None)
    assert len(puppet.offered) == 1  # the model was called once, not retried


def test_an_infinity_in_a_model_s_tool_call_ends_the_loop_cleanly(gate, puppet):
    Tool.objects.get_or_create(name="poison.measure", defaults={"side_effect": "read"})
    poisoner = Agent.objects.create(name="poisoner", provider="puppet", model="puppet-1")
    poisoner.tools.set(Tool.objects.filter(name="poison.measure"))
    puppet.turns = [Turn(calls=[("poison.measure", {"scale": -math.inf})])]
    run = settled(drive(run_start(workflow="poison.agent", input={}, agent=poisoner).pk))
    assert run.status == "failed"
    assert "result.tool_calls[0].arguments.scale is not a finite number" in run.error
    assert not run.step_set.filter(kind="tool").exists()


def test_a_tool_s_nan_fails_its_step_and_the_workflow_may_catch_it(gate):
    run = settled(drive(run_start(workflow="poison.measure", input={}).pk))
    assert run.status == "completed"
    assert run.result == {
        "caught": "NonRetryable: the result cannot be recorded: result.ratio is not a finite number"
    }
    step = run.step_set.get()
    assert (step.status, step.attempt, step.output) == ("failed", 1, None)


def test_a_last_write_the_database_refuses_still_ends_the_run_failed(gate, puppet):
    puppet.turns = [Turn(parsed={"amount": 5}, tokens=-10)]  # a counter the database refuses
    run = settled(drive(run_start(workflow="poison.decide", input={}).pk))
    assert run.status == "failed"
    assert run.error.startswith(
        "The run ended; its last steps could not be recorded: IntegrityError"
    )
    assert run.result is None
    assert run.events.filter(kind="run.failed").count() == 1
