"""Totals: a policy sees what the same tool has done in the run, for the agent over a day and on
the same target over all time, so splitting an action into small ones does not evade a limit.
Run with the real engine, gate and seeded demo policy."""

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from approvals.policy.aggregates import totals
from approvals.policy.decide import decide
from approvals.policy.models import PolicyEvaluation
from approvals.queue.models import ApprovalRequest, ReviewerTeam
from approvals.queue.services import approval_decide
from orchestration.demo.models import Refund
from orchestration.engine.errors import ActionDenied, ActionRejected
from orchestration.gate import Action
from orchestration.registry.declare import workflow
from orchestration.runs.models import Step
from orchestration.runs.services import run_start
from tests.orchestration.engine.conftest import drive

pytestmark = pytest.mark.django_db(transaction=True)


@workflow("_split_refund")
def split_refund(ctx, order_id: str, amount: float, times: int) -> dict:
    """A compromised refund loop: many refunds, each under the old small-refund limit."""
    done = []
    for i in range(times):
        try:
            done.append(
                ctx.tool("payments.refund", order_id=order_id, amount=amount, reason=f"{i}")
            )
        except (ActionDenied, ActionRejected):
            break
    return {"refunds": len(done)}


@pytest.fixture
def reviewer():
    user = get_user_model().objects.create_user("fin")
    ReviewerTeam.objects.get_or_create(name="finance")[0].members.add(user)
    return user


def split(order_id="A-1004", amount=99.89, times=19):
    run = run_start(
        workflow="_split_refund",
        agent="refund-bot",
        input={"order_id": order_id, "amount": amount, "times": times},
    )
    return drive(run.pk)


def refunded(order_id="A-1004") -> float:
    return round(sum(float(r.amount) for r in Refund.objects.filter(order__order_id=order_id)), 2)


def test_nineteen_small_refunds_on_one_order_reach_finance_once_the_order_passes_500(
    policy_gate, reviewer
):
    run = split()
    assert run.status == "waiting"
    assert refunded() == 499.45  # five refunds of 99.89 ran on their own
    request = ApprovalRequest.objects.get(run_id=run.pk)
    assert (request.tool, request.team, request.quorum) == ("payments.refund", "finance", 1)
    assert "Large refunds need finance" in request.verdict["rules"]
    evaluation = PolicyEvaluation.objects.filter(run_id=run.pk, step_seq=request.step_seq).last()
    assert evaluation.input["totals"]["target"] == {"count": 6, "sum": {"amount": 599.34}}

    approval_decide(request=request, reviewer=reviewer, verdict="approve")
    run = drive(run.pk)
    assert refunded() == 599.34  # the approved sixth; the seventh asks again
    assert run.status == "waiting"
    assert ApprovalRequest.objects.filter(run_id=run.pk, status="pending").count() == 1


def test_splitting_over_runs_is_counted_on_the_order(policy_gate):
    assert split(amount=300, times=1).status == "completed"
    second = split(amount=300, times=1)
    assert second.status == "waiting"  # 600 on A-1004 in all
    assert refunded() == 300
    other_order = split(order_id="A-1002", amount=300, times=1)
    assert other_order.status == "completed"  # another order: its own total


def test_splitting_over_orders_in_one_run_is_counted_on_the_run(policy_gate):
    from orchestration.registry.declare import WORKFLOWS

    @workflow("_refund_orders")
    def refund_orders(ctx) -> None:
        for order_id in ("A-1002", "A-1003", "A-1004"):
            ctx.tool("payments.refund", order_id=order_id, amount=200.0)

    try:
        run = drive(run_start(workflow="_refund_orders", agent="refund-bot", input={}).pk)
        assert run.status == "waiting"
        assert [float(r.amount) for r in Refund.objects.order_by("id")] == [200.0, 200.0]
        assert ApprovalRequest.objects.get(run_id=run.pk).team == "finance"
    finally:
        WORKFLOWS.pop(("_refund_orders", 1), None)


def test_totals_count_what_executed_in_their_windows_with_a_few_queries(policy_gate):
    first = split(amount=100, times=2)  # 200 on A-1004 in a finished run
    run = run_start(
        workflow="_split_refund",
        agent="refund-bot",
        input={"order_id": "A-1004", "amount": 1, "times": 0},
    )

    def seen(**args):
        with CaptureQueriesContext(connection) as queries:
            found = totals(
                tool="payments.refund", args=args, run_id=run.pk, step_seq=9, agent="refund-bot"
            )
        assert len(queries) == 3
        return found

    now = seen(order_id="A-1004", amount=50)
    assert now["target"] == {"count": 3, "sum": {"amount": 250.0}}  # this one included
    assert now["agent"] == {"count": 3, "sum": {"amount": 250.0}}
    assert now["run"] == {"count": 1, "sum": {"amount": 50.0}}
    assert seen(order_id="A-1003", amount=50)["target"] == {"count": 1, "sum": {"amount": 50.0}}

    # a refused or waiting step never moved money; an approved edit counts as it executed
    Step.objects.filter(run=first, name="payments.refund", seq=1).update(status="failed")
    steps = Step.objects.filter(run=first, name="payments.refund").exclude(status="failed")
    steps.update(verdict={"outcome": "approved", "args": {"order_id": "A-1004", "amount": 80}})
    assert seen(order_id="A-1004", amount=50)["target"]["sum"] == {"amount": 130.0}

    # outside the agent's day; the target ("the order in total") has no window
    steps.update(started_at=timezone.now() - timedelta(days=2))
    later = seen(order_id="A-1004", amount=50)
    assert later["agent"]["count"] == 1 and later["target"]["count"] == 2
    steps.update(started_at=timezone.now() - timedelta(days=400))
    assert seen(order_id="A-1004", amount=50)["target"]["count"] == 2


def test_an_orders_refunds_add_up_however_far_apart(policy_gate):
    """Waiting a month does not reset "refunds up to 500 EUR for an order in total"."""
    first = split(amount=300, times=1)
    Step.objects.filter(run=first).update(started_at=timezone.now() - timedelta(days=31))
    second = split(amount=300, times=1)
    assert second.status == "waiting" and refunded() == 300
    assert ApprovalRequest.objects.get(run_id=second.pk).team == "finance"


def test_totals_are_in_the_stored_input_and_a_rule_can_use_the_agents(policy_gate):
    from approvals.policy.models import Rule
    from approvals.policy.services import policy_publish

    Rule.objects.create(
        name="A busy refund day",
        tool_patterns=["payments.refund"],
        condition="totals.agent.count > 2",
        outcome="deny",
        priority=5,
    )
    policy_publish(by="policy")
    run = split(order_id="A-1001", amount=10, times=5)
    assert run.result == {"refunds": 2}
    denied = run.step_set.get(seq=3)
    assert denied.error_type == "ActionDenied"
    assert denied.verdict["rules"][0] == "A busy refund day"
    action = Action(
        tool="payments.refund", args={"order_id": "A-1001", "amount": 5}, run_id=run.pk, step_seq=10
    )
    decision = decide(action, run)
    assert decision.input["totals"]["agent"]["count"] == 3


def test_the_agent_total_is_the_acting_agents(policy_gate):
    """A step records the agent that acted (a nested agent acts as itself in another's run)."""
    run = run_start(
        workflow="_split_refund",
        agent="refund-bot",
        input={"order_id": "A-1004", "amount": 1, "times": 0},
    )
    Step.objects.create(
        run=run,
        seq=1,
        kind="tool",
        name="payments.refund",
        status="completed",
        input={"args": {"order_id": "A-1001", "amount": 40}, "agent": "infra-agent"},
        started_at=timezone.now(),
        idempotency_key=f"{run.pk}-1",
    )

    def agent_total(agent):
        args = {"order_id": "A-1002", "amount": 1}
        found = totals(tool="payments.refund", args=args, run_id=run.pk, step_seq=2, agent=agent)
        return found["agent"]

    assert agent_total("infra-agent") == {"count": 2, "sum": {"amount": 41.0}}
    assert agent_total("refund-bot") == {"count": 1, "sum": {"amount": 1.0}}


def test_two_concurrent_refunds_of_one_order_cannot_both_pass_its_limit(policy_gate, monkeypatch):
    """Two workers refund 400 of one order at once: the second runs its whole refund between the
    first's verdict and its refund. Each review reads after its own step is marked started, so
    the later one sees the other and the 800 needs finance."""
    from approvals.policy.gate import PolicyGate
    from orchestration.engine.runner import run_advance

    runs = [
        run_start(
            workflow="_split_refund",
            agent="refund-bot",
            input={"order_id": "A-1004", "amount": 400, "times": 1},
        )
        for _ in range(2)
    ]
    real = PolicyGate.review

    def review(self, action, *, run_id, step_seq):
        verdict = real(self, action, run_id=run_id, step_seq=step_seq)
        if run_id == runs[0].pk and not Step.objects.filter(run=runs[1]).exists():
            run_advance(runs[1].pk)  # the other worker, in this worker's window
        return verdict

    monkeypatch.setattr(PolicyGate, "review", review)
    statuses = sorted(drive(run.pk).status for run in runs)
    assert statuses == ["completed", "waiting"]
    assert refunded() == 400
    assert ApprovalRequest.objects.get().team == "finance"


@pytest.mark.postgres
def test_two_workers_refunding_one_order_in_threads(policy_gate, monkeypatch):
    """The same with two real workers on PostgreSQL; a barrier after both reviews began only
    makes the overlap certain."""
    import threading

    from django.db import connections

    from approvals.policy.gate import PolicyGate

    runs = [
        run_start(
            workflow="_split_refund",
            agent="refund-bot",
            input={"order_id": "A-1004", "amount": 400, "times": 1},
        )
        for _ in range(2)
    ]
    real, barrier = PolicyGate.review, threading.Barrier(2, timeout=20)

    def review(self, action, *, run_id, step_seq):
        barrier.wait()
        return real(self, action, run_id=run_id, step_seq=step_seq)

    monkeypatch.setattr(PolicyGate, "review", review)

    failures = []

    def work(pk):
        try:
            drive(pk)
        except BaseException as exc:  # a worker that crashed proves nothing
            failures.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=work, args=(run.pk,)) for run in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads) and failures == []
    assert refunded() <= 400
    assert ApprovalRequest.objects.filter(team="finance").exists()
