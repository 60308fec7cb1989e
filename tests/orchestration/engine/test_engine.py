"""The engine in one process: the task body (run_advance) driven directly, on the test database."""

import time
from collections import Counter

import pytest

from orchestration.demo.models import InfraChange
from orchestration.engine.errors import ActionDenied, ActionRejected, NonRetryable, StepFailed
from orchestration.engine.runner import run_advance
from orchestration.gate import Answer, Verdict
from orchestration.ledger.chain import ledger_verify
from orchestration.ledger.models import AuditRecord
from orchestration.registry.declare import WORKFLOWS, tool, workflow
from orchestration.registry.models import Agent, Tool
from orchestration.runs.models import Run, Step
from orchestration.runs.services import RunError, run_halt, run_resume, run_retry, run_start
from tests.orchestration.engine.conftest import drive

# Tools run on the engine's helper thread, with a connection of its own: the tests commit.
pytestmark = pytest.mark.django_db(transaction=True)

SLEEP = 0.5  # test.sleepy's durable sleep, in seconds
CALLS: Counter[str] = Counter()
FLAKY: dict[str, int] = {}


@tool(
    "test.effect",
    side_effect="write",
    schema={
        "type": "object",
        "properties": {"label": {"type": "string"}},
        "required": ["label"],
        "additionalProperties": False,
    },
)
def effect(*, label: str, idempotency_key: str) -> dict:
    """Make a visible, idempotent effect."""
    CALLS[label] += 1
    change, _ = InfraChange.objects.get_or_create(
        idempotency_key=idempotency_key, defaults={"kind": "test", "target": label}
    )
    return {"change_id": change.pk, "label": label}


@tool("test.flaky", side_effect="read", schema={"type": "object"})
def flaky(*, idempotency_key: str, fail_times: int = 2, permanent: bool = False) -> dict:
    """Fail ``fail_times`` times, then succeed."""
    CALLS["flaky"] += 1
    if permanent and FLAKY.get("broken", True):
        raise NonRetryable("the order does not exist")
    FLAKY[idempotency_key] = FLAKY.get(idempotency_key, 0) + 1
    if FLAKY[idempotency_key] <= fail_times:
        raise ConnectionError("upstream reset the connection")
    return {"ok": True, "attempts": FLAKY[idempotency_key]}


@tool("test.slow", side_effect="read", timeout=0.2, schema={"type": "object"})
def slow(*, idempotency_key: str) -> dict:
    """Take longer than the tool's timeout."""
    time.sleep(0.5)
    return {}


@tool(
    "test.halts_its_run",
    side_effect="write",
    schema={"type": "object", "properties": {"run_id": {"type": "integer"}}},
)
def halts_its_run(*, run_id: int, idempotency_key: str) -> dict:
    """A reviewer halts the run while this tool runs."""
    run_halt(run=run_id, by="reviewer-ann", reason="wrong customer")
    return {"halted": run_id}


@workflow("test.sleepy", tools=["test.effect"])
def sleepy(ctx, label: str = "a") -> dict:
    first = ctx.tool("test.effect", label=label)
    try:
        ctx.sleep(SLEEP)  # long enough that "not due yet" holds on a busy machine
    except Exception:  # a workflow that swallows errors must not swallow the suspend
        return {"swallowed": True}
    ctx.tool("test.effect", label=label + "-after")
    return {"first": first["change_id"], "when": ctx.now().isoformat(), "id": ctx.uuid()}


@workflow("test.flaky", tools=["test.flaky"])
def flaky_workflow(ctx, fail_times: int = 2, permanent: bool = False) -> dict:
    try:
        return ctx.tool("test.flaky", fail_times=fail_times, permanent=permanent)
    except StepFailed as exc:
        return {"gave_up": str(exc)}


@workflow("test.flaky_uncaught", tools=["test.flaky"])
def flaky_uncaught(ctx) -> dict:
    return ctx.tool("test.flaky", permanent=True, fail_times=0)


@workflow("test.slow", tools=["test.slow"])
def slow_workflow(ctx) -> dict:
    return ctx.tool("test.slow")


@workflow("test.many", tools=["test.effect"])
def many(ctx, n: int = 5, same: bool = False) -> dict:
    for i in range(n):
        ctx.tool("test.effect", label="same" if same else f"e{i}")
    return {"done": n}


@workflow("test.gated", tools=["test.effect"])
def gated(ctx) -> dict:
    try:
        ctx.tool("test.effect", label="risky", _reasoning="the customer asked", _confidence=0.4)
    except ActionDenied as denied:
        return {"rerouted": denied.reason}
    except ActionRejected as rejected:
        return {"rejected": rejected.reason}
    return {"done": True}


@workflow("test.ask")
def ask(ctx) -> dict:
    pick = ctx.ask_human("Which hotel?", choices=["Sea Breeze", "Quiet Cove"])
    return {"pick": pick}


@workflow("test.halt_midway", tools=["test.halts_its_run", "test.effect"])
def halt_midway(ctx) -> dict:
    ctx.tool("test.halts_its_run", run_id=ctx.run.pk)
    ctx.tool("test.effect", label="after-halt")
    return {}


def effects(label: str) -> int:
    return InfraChange.objects.filter(target=label).count()


@pytest.fixture(autouse=True)
def _reset():
    CALLS.clear()
    FLAKY.clear()


def test_replay_returns_recorded_results_without_repeating_side_effects(gate):
    run = run_start(workflow="test.sleepy", input={"label": "r1"})
    assert run.status == "pending"
    run = drive(run.pk)
    assert run.status == "completed", run.error
    assert CALLS["r1"] == 1 and effects("r1") == 1  # the first tool ran once across two slices
    assert CALLS["r1-after"] == 1
    assert [s.kind for s in run.step_set.order_by("seq")] == [
        "tool",
        "sleep",
        "tool",
        "now",
        "uuid",
    ]
    assert run.result["first"] == InfraChange.objects.get(target="r1").pk
    assert ledger_verify().ok
    verbs = list(AuditRecord.objects.filter(run_id=run.pk).values_list("verb", flat=True))
    assert verbs == ["run.created", "run.started", "run.completed"]


def test_except_exception_does_not_swallow_a_suspend(gate):
    run = drive(run_start(workflow="test.sleepy", input={"label": "s"}).pk)
    assert run.result.get("swallowed") is None


def test_changed_workflow_code_raises_the_non_determinism_error(gate, monkeypatch):
    run = run_start(workflow="test.sleepy", input={"label": "nd"})
    drive(run.pk, timers=False)  # sleeping after step 1

    def changed(ctx, label="a"):
        ctx.tool("test.flaky")  # step 1 used to be test.effect
        return {}

    definition = WORKFLOWS[("test.sleepy", 1)]
    monkeypatch.setitem(
        WORKFLOWS,
        ("test.sleepy", 1),
        type(definition)(name=definition.name, version=1, fn=changed, description=""),
    )
    time.sleep(SLEEP + 0.01)
    run = drive(run.pk)
    assert run.status == "failed"
    assert "Non-determinism: step 1" in run.error
    assert "test.effect" in run.error and CALLS["flaky"] == 0


def test_retryable_errors_back_off_and_retry_with_each_attempt_recorded(gate):
    run = drive(run_start(workflow="test.flaky", input={"fail_times": 2}).pk)
    assert run.status == "completed"
    assert run.result == {"ok": True, "attempts": 3}
    step = run.step_set.get()
    assert (step.attempt, step.status) == (3, "completed")
    retries = run.events.filter(kind="tool.retrying").values_list("message", flat=True)
    assert [m.startswith("Attempt") and "ConnectionError" in m for m in retries] == [True, True]


def test_retries_are_bounded_and_the_workflow_can_catch_the_failure(gate):
    run = drive(run_start(workflow="test.flaky", input={"fail_times": 10}).pk)
    assert run.status == "completed"
    assert "ConnectionError" in run.result["gave_up"]
    assert CALLS["flaky"] == 3  # the tool policy's attempts


def test_a_non_retryable_error_fails_at_once_and_a_policy_admin_can_retry_the_run(gate):
    run = drive(run_start(workflow="test.flaky_uncaught", input={}).pk)
    assert run.status == "failed"
    assert "NonRetryable: the order does not exist" in run.error
    assert CALLS["flaky"] == 1

    FLAKY["broken"] = False  # the cause is fixed
    run_retry(run=run, by="policy")
    run = drive(run.pk)
    assert run.status == "completed", run.error
    step = run.step_set.get()
    assert step.attempt == 2
    kinds = list(run.events.values_list("kind", flat=True))
    assert kinds.index("run.failed") < kinds.index("run.retried") < kinds.index("run.completed")
    with pytest.raises(RunError, match="Only failed runs"):
        run_retry(run=run, by="policy")


def test_a_tool_that_times_out_is_retried_then_fails(gate):
    run = drive(run_start(workflow="test.slow", input={}).pk)
    assert run.status == "failed"
    assert "timed out after 0.2s" in run.error
    assert run.step_set.get().attempt == 3


def test_step_budget_is_checked_before_the_call(gate):
    run = run_start(workflow="test.many", input={"n": 5})
    Run.objects.filter(pk=run.pk).update(budgets={"max_steps": 3})
    run = drive(run.pk)
    assert run.status == "failed"
    assert run.error == "Budget exhausted: steps budget of 3 exhausted"
    assert InfraChange.objects.count() == 3  # the fourth call never started


def test_the_same_call_repeated_is_a_loop(gate):
    run = drive(run_start(workflow="test.many", input={"n": 5, "same": True}).pk)
    assert run.status == "failed"
    assert "loop detected: test.effect called 3 times with the same arguments" in run.error


def test_a_denied_action_is_catchable_and_the_run_reroutes(gate):
    gate.verdicts["test.effect"] = Verdict("deny", reason="refunds above 500 need a manager")
    run = drive(run_start(workflow="test.gated", input={}).pk)
    assert run.result == {"rerouted": "refunds above 500 need a manager"}
    assert effects("risky") == 0
    action = gate.reviewed[0]
    assert (action.reasoning, action.confidence, action.args) == (
        "the customer asked",
        0.4,
        {"label": "risky"},
    )


def test_pending_suspends_and_resume_asks_again_then_executes_the_approved_arguments(gate):
    gate.verdicts["test.effect"] = Verdict("pending")
    run = drive(run_start(workflow="test.gated", input={}).pk)
    assert run.status == "waiting" and run.lease_owner == ""
    assert run.step_set.get().status == "waiting" and effects("risky") == 0

    gate.verdicts["test.effect"] = Verdict(
        "approved", args={"label": "risky-edited"}, diff={"label": ["risky", "risky-edited"]}
    )
    run_resume(run_id=run.pk, note="approved with an edit")
    run = drive(run.pk)
    assert run.status == "completed"
    assert len(gate.reviewed) == 2  # asked again on resume
    assert effects("risky") == 0 and effects("risky-edited") == 1


def test_the_gate_reviews_a_step_already_started_with_the_run_so_far_committed(gate, monkeypatch):
    """What concurrent reviews of one total rely on: a step counts as executing before its
    review reads the database, and the previous step's finish is committed by then. The
    verdict is recorded with the step's finish, with its event."""
    seen = []
    original = gate.review

    def review(self, action, *, run_id, step_seq):
        rows = Step.objects.filter(run_id=run_id).order_by("seq")
        seen.append([(s.seq, s.status, s.verdict) for s in rows])
        return original(self, action, run_id=run_id, step_seq=step_seq)

    monkeypatch.setattr(gate, "review", review)
    run = drive(run_start(workflow="test.many", input={"n": 2}).pk)
    assert run.status == "completed"
    first, second = seen
    assert first == [(1, "started", None)]
    assert second[0][:2] == (1, "completed") and second[0][2]["outcome"] == "allow"
    assert second[1] == (2, "started", None)
    assert [s.verdict["outcome"] for s in run.step_set.order_by("seq")] == ["allow", "allow"]
    verdicts = run.events.filter(kind="verdict.allow").values_list("step_seq", flat=True)
    assert sorted(verdicts) == [1, 2]


def test_a_rejection_returns_the_reason_to_the_workflow(gate):
    gate.verdicts["test.effect"] = Verdict("rejected", reason="wrong customer")
    run = drive(run_start(workflow="test.gated", input={}).pk)
    assert run.result == {"rejected": "wrong customer"}
    step = run.step_set.get()
    assert (step.status, step.error_type, step.verdict["outcome"]) == (
        "failed",
        "ActionRejected",
        "rejected",
    )


def test_ask_human_waits_durably_for_the_answer(gate):
    run = drive(run_start(workflow="test.ask", input={}).pk)
    assert run.status == "waiting"
    step = run.step_set.get()
    assert step.input == {
        "question": "Which hotel?",
        "choices": ["Sea Breeze", "Quiet Cove"],
        "about": {},
    }
    gate.answers[run.pk] = Answer(choice="Quiet Cove", by="reviewer-ann")
    run_resume(run_id=run.pk)
    run = drive(run.pk)
    assert run.result == {"pick": "Quiet Cove"}
    assert run.step_set.get().output["by"] == "reviewer-ann"


def test_no_step_starts_after_a_halt_commits(gate):
    run = drive(run_start(workflow="test.halt_midway", input={}).pk)
    assert run.status == "halted"
    assert (run.halted_by, run.halt_reason) == ("reviewer-ann", "wrong customer")
    assert effects("after-halt") == 0 and CALLS["after-halt"] == 0
    assert gate.cancelled == [run.pk]
    assert drive(run.pk).status == "halted"  # a late message cannot restart it
    with pytest.raises(RunError, match="already halted"):
        run_halt(run=run, by="x", reason="again")


def test_halting_requires_a_reason(gate):
    run = run_start(workflow="test.ask", input={})
    with pytest.raises(RunError, match="reason is required"):
        run_halt(run=run, by="ann", reason="  ")


def test_durable_sleep_frees_the_worker_until_it_is_due(gate):
    run = run_start(workflow="test.sleepy", input={"label": "z"})
    from orchestration.engine.runner import run_advance

    assert run_advance(run.pk) == "waiting"
    assert Run.objects.get(pk=run.pk).wake_at is not None
    assert run_advance(run.pk) == "skipped"  # not due yet
    time.sleep(SLEEP + 0.01)
    assert drive(run.pk).status == "completed"


def test_input_is_validated_against_the_workflow_schema(gate):
    with pytest.raises(RunError) as error:
        run_start(workflow="customer_refund", input={"order_id": "nope"})
    messages = error.value.messages
    assert "input: 'reason' is a required property" in messages
    assert any(m.startswith("order_id: 'nope' does not match") for m in messages)
    assert not Run.objects.exists()


def test_invalid_tool_arguments_are_refused_before_the_gate(gate):
    @workflow("test.bad_args", tools=["test.*"])
    def bad_args(ctx):
        ctx.tool("test.effect", label=7)

    run = drive(run_start(workflow="test.bad_args", input={}).pk)
    assert run.status == "failed"
    assert "InvalidArguments: test.effect label: 7 is not of type 'string'" in run.error
    assert gate.reviewed == []


def test_handoff_child_gets_the_intersection_of_tools(gate):
    Tool.objects.get_or_create(name="test.effect", defaults={"side_effect": "write"})
    tools = {
        t.name: t
        for t in Tool.objects.filter(
            name__in=["test.effect", "infra.diagnostics", "infra.delete_volume"]
        )
    }
    caller = Agent.objects.create(name="caller")
    caller.tools.set([tools["test.effect"], tools["infra.diagnostics"]])
    callee = Agent.objects.create(name="callee")
    callee.tools.set([tools["infra.diagnostics"], tools["infra.delete_volume"]])

    @workflow("test.handoff")
    def handing_off(ctx):
        return ctx.handoff("callee", goal="check the billing service: service: billing")

    parent = run_start(workflow="test.handoff", input={}, agent=caller)
    parent = drive(parent.pk)
    assert parent.status == "waiting"
    child = parent.children.get()
    assert child.allowed_tools == ["infra.diagnostics"]
    child = drive(child.pk)
    assert child.status == "completed", child.error
    called = list(child.step_set.filter(kind="tool").values_list("name", flat=True))
    assert called == ["infra.diagnostics"]  # never delete_volume: the caller lacks it
    parent = drive(parent.pk)
    assert parent.status == "completed"
    assert parent.result == child.result


def test_steps_record_cost_and_tokens_of_model_calls(gate):
    @workflow("test.llm")
    def llm_flow(ctx):
        return ctx.llm([{"role": "user", "content": "Say hello to the reviewer."}], name="greet")

    run = drive(run_start(workflow="test.llm", input={}).pk)
    step = run.step_set.get()
    assert step.kind == "llm" and step.tokens > 0 and step.cost_usd > 0
    assert step.input["messages"][0]["content"] == "Say hello to the reviewer."
    assert run.tokens == step.tokens and run.cost_usd == step.cost_usd
    assert Step.objects.filter(run=run).count() == 1


def test_an_exhausted_budget_can_be_extended_by_a_reviewer(gate):
    run = run_start(workflow="test.many", input={"n": 4})
    Run.objects.filter(pk=run.pk).update(budgets={"max_steps": 2, "ask_to_extend": True})
    run = drive(run.pk)
    assert run.status == "waiting"
    budget = run.step_set.get(kind="budget")
    assert budget.input == {"budget": "max_steps", "limit": 2, "used": 2}
    assert InfraChange.objects.count() == 2

    gate.answers[run.pk] = Answer(choice="Extend", by="reviewer-ann")
    run_resume(run_id=run.pk)
    run = drive(run.pk)
    assert run.status == "completed", run.error
    assert run.budgets["max_steps"] == 4
    assert InfraChange.objects.count() == 4
    assert [s.kind for s in run.step_set.order_by("seq")] == [
        "tool",
        "tool",
        "budget",
        "tool",
        "tool",
    ]
    assert run.events.filter(kind="budget.extended").exists()


def test_a_declined_extension_fails_the_run(gate):
    run = run_start(workflow="test.many", input={"n": 4})
    Run.objects.filter(pk=run.pk).update(budgets={"max_steps": 2, "ask_to_extend": True})
    gate.answers[run.pk] = Answer(choice="Stop", by="reviewer-ann")
    run = drive(run.pk)
    assert run.status == "failed"
    assert run.error == "Budget exhausted: steps budget of 2 exhausted; extension declined"
    assert InfraChange.objects.count() == 2


def test_a_workflow_that_now_stops_early_is_non_deterministic_too(gate, monkeypatch):
    run = run_start(workflow="test.sleepy", input={"label": "early"})
    drive(run.pk, timers=False)  # recorded: tool, sleep

    def shorter(ctx, label="a"):
        ctx.tool("test.effect", label=label)
        return {}

    definition = WORKFLOWS[("test.sleepy", 1)]
    monkeypatch.setitem(
        WORKFLOWS,
        ("test.sleepy", 1),
        type(definition)(name=definition.name, version=1, fn=shorter, description=""),
    )
    time.sleep(SLEEP + 0.01)
    run = drive(run.pk)
    assert run.status == "failed"
    assert run.error == (
        "Non-determinism: the workflow returned at step 1 but the run recorded 2 steps"
    )


def test_waiting_again_for_the_same_thing_is_not_logged_twice(gate):
    gate.verdicts["test.effect"] = Verdict("pending")
    run = drive(run_start(workflow="test.gated", input={}).pk)
    run_resume(run_id=run.pk)  # a stray wake-up: still pending
    run = drive(run.pk)
    assert run.status == "waiting"
    assert run.events.filter(kind="run.waiting").count() == 1


def test_the_sweep_enqueues_a_due_run_once_until_a_worker_takes_it(gate):
    from orchestration.tasks import sweep_runs

    run = run_start(workflow="test.sleepy", input={"label": "sw"})
    drive(run.pk, timers=False)  # sleeping
    time.sleep(SLEEP + 0.01)
    assert sweep_runs() == 1
    assert sweep_runs() == 0  # its message is still on the way
    drive(run.pk)  # a worker takes it: the next timer may be swept again at once
    assert Run.objects.get(pk=run.pk).swept_at is None


def test_a_decision_made_while_the_worker_still_holds_the_run_is_not_lost(gate):
    """The reviewer decides between the gate opening the request and the worker suspending the
    run: the resume's message finds the lease taken, so the suspend must see it and go again."""
    from orchestration.tasks import sweep_runs

    original = gate.review

    def review_then_decided_at_once(self, action, *, run_id, step_seq):
        verdict = original(self, action, run_id=run_id, step_seq=step_seq)
        if verdict.outcome == "pending":
            gate.verdicts["test.effect"] = Verdict("approved")
            run_resume(run_id=run_id, note="approved within the worker's slice")
        return verdict

    gate.verdicts["test.effect"] = Verdict("pending")
    gate.review = review_then_decided_at_once
    try:
        run = run_start(workflow="test.gated", input={})
        run_advance(run.pk)  # asks, is decided meanwhile, suspends
        run = Run.objects.get(pk=run.pk)
        assert (run.status, run.lease_owner) == ("waiting", "")
        assert sweep_runs() == 1  # still due: beat would wake it even if the message were lost
        assert drive(run.pk).status == "completed"
    finally:
        gate.review = original
