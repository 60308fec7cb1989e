"""Simulating a draft: replaying stored evaluations predicts what publishing then does."""

from collections import Counter

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError

from approvals.policy.models import PolicyEvaluation, Rule
from approvals.policy.services import draft_snapshot, policy_publish
from approvals.policy.simulate import simulate
from approvals.queue.models import ApprovalRequest, ReviewerTeam
from approvals.queue.services import approval_decide
from orchestration.demo.models import Refund
from orchestration.registry.models import Agent, Tool
from orchestration.runs.services import run_start
from tests.orchestration.engine.conftest import drive

pytestmark = pytest.mark.django_db(transaction=True)

# amounts 89, 649, 219, 1899, 45: three within the refund policy (allowed, and so is the
# confirmation to the customer) and two above 500 (the finance rule asks)
ORDERS = ["A-1001", "A-1002", "A-1003", "A-1004", "A-1005"]


def refund_runs(agent="refund-bot") -> dict[str, int]:
    """One refund run per order, each driven until it waits for its first ask (or ends)."""
    runs = {}
    for order in ORDERS:
        run = run_start(
            workflow="customer_refund",
            agent=agent,
            input={"order_id": order, "reason": "It arrived broken."},
        )
        runs[order] = drive(run.pk).pk
    return runs


def evaluations(run_ids: dict[str, int]) -> dict[tuple[str, int], PolicyEvaluation]:
    """The first evaluation of each step of the runs, by (order, step)."""
    order_of = {run_id: order for order, run_id in run_ids.items()}
    found = {}
    for evaluation in PolicyEvaluation.objects.filter(run_id__in=order_of).order_by("id"):
        found.setdefault((order_of[evaluation.run_id], evaluation.step_seq), evaluation)
    return found


def pairs(moves) -> Counter:
    return Counter({(m.before, m.after): m.count for m in moves})


def test_simulation_predicts_exactly_the_counts_that_publishing_then_produces(policy_gate):
    before = evaluations(refund_runs())
    assert {e.outcome for e in before.values()} == {"allow", "ask"}

    # the draft: refunds up to 250 run on their own; above 1000 they are refused
    Rule.objects.filter(name="Small refunds within policy").update(condition="args.amount <= 250.0")
    Rule.objects.filter(name="Large refunds need finance").update(
        condition="args.amount > 1000.0", outcome="deny"
    )
    report = simulate()
    assert report.version_before == 1
    assert report.evaluated == len(before) == PolicyEvaluation.objects.count()
    assert report.errors == []
    assert pairs(report.moves) == {
        ("allow", "allow"): 11,  # five lookups, the refunds of 89, 219 and 45, their emails
        ("ask", "ask"): 1,  # 649, no longer the rule's, scores between the supervised
        # thresholds (35 and 90) with the data the run touched
        ("ask", "deny"): 1,  # 1899 by the rule
    }
    assert report.changed == 1
    assert (report.asks_per_day_before, report.asks_per_day_after) == (2 / 7, 1 / 7)

    # publish, then the same actions again, for real: the same workflows on the same orders
    assert policy_publish(by="policy").number == 2
    Refund.objects.all().delete()  # the orders as they were, so the workflows do the same
    after = evaluations(refund_runs())
    real, real_by_tool, real_by_agent = Counter(), {}, {}
    for key, old in before.items():
        new = after[key]
        assert (new.tool, new.action_hash) == (old.tool, old.action_hash)  # the same action
        assert new.policy_version == 2
        pair = (old.outcome, new.outcome)
        real[pair] += 1
        real_by_tool.setdefault(old.tool, Counter())[pair] += 1
        real_by_agent.setdefault(old.agent, Counter())[pair] += 1
    assert pairs(report.moves) == real
    key_of = {old.pk: key for key, old in before.items()}
    for move in report.moves:  # each example moved as its move says
        for pk in move.examples:
            assert (before[key_of[pk]].outcome, after[key_of[pk]].outcome) == (
                move.before,
                move.after,
            )
    assert {tool: pairs(moves) for tool, moves in report.by_tool.items()} == real_by_tool
    assert {agent: pairs(moves) for agent, moves in report.by_agent.items()} == real_by_agent


def test_an_unchanged_draft_moves_nothing_and_examples_are_real(policy_gate):
    refund_runs()
    report = simulate()
    assert report.evaluated == PolicyEvaluation.objects.count() > 0
    assert report.changed == 0
    assert all(move.before == move.after for move in report.moves)
    assert report.asks_per_day_before == report.asks_per_day_after == 2 / 7

    for move in report.moves:
        assert 1 <= len(move.examples) <= min(3, move.count)
        outcomes = PolicyEvaluation.objects.filter(pk__in=move.examples)
        assert sorted(outcomes.values_list("pk", flat=True)) == sorted(move.examples)
        assert set(outcomes.values_list("outcome", flat=True)) == {move.before}
    for grouped in (report.by_tool, report.by_agent):
        summed = Counter()
        for moves in grouped.values():
            summed.update(pairs(moves))
        assert summed == pairs(report.moves)
        assert sum(summed.values()) == report.evaluated
    assert set(report.by_tool) == {"orders.lookup", "payments.refund", "email.send"}
    assert set(report.by_agent) == {"refund-bot"}
    for tool, moves in report.by_tool.items():
        for move in moves:
            assert set(
                PolicyEvaluation.objects.filter(pk__in=move.examples).values_list("tool", flat=True)
            ) == {tool}


def test_a_broken_stored_input_is_reported_not_raised(policy_gate):
    refund_runs()
    good = PolicyEvaluation.objects.count()
    broken = PolicyEvaluation.objects.order_by("id").first()
    broken.pk = None
    broken.input = {"action": {"tool": "orders.lookup"}}  # no args, agent, run or time
    broken.save()
    report = simulate()
    assert report.evaluated == good
    assert len(report.errors) == 1
    assert report.errors[0].startswith(f"evaluation {broken.pk} (orders.lookup): KeyError")
    assert broken.pk not in {pk for move in report.moves for pk in move.examples}


def test_a_grant_deny_stays_a_deny(policy_gate):
    """The stored evaluation does not say the grant check decided; without grants the replay
    would allow the lookup, but publishing does not change grants: it stays a deny."""
    travel = Agent.objects.get(name="travel-agent")  # granted travel.* only
    travel.tools.add(Tool.objects.get(name="orders.lookup"))  # usable, not granted
    run = run_start(
        workflow="customer_refund",
        agent="travel-agent",
        input={"order_id": "A-1001", "reason": "It arrived broken."},
    )
    drive(run.pk)
    denied = PolicyEvaluation.objects.get(run_id=run.pk)
    assert (denied.tool, denied.outcome, denied.rules) == ("orders.lookup", "deny", [])
    report = simulate()
    assert pairs(report.moves) == {("deny", "deny"): 1}
    assert report.denied_by_grants == 1


def test_the_window_the_tool_metadata_and_a_draft_publishing_would_refuse(policy_gate):
    refund_runs()
    snapshot = draft_snapshot()
    snapshot["tools"]["orders.lookup"] = {
        **snapshot["tools"]["orders.lookup"],
        "side_effect": "delete",
        "impact": 4,
        "reversible": False,
    }  # 20 + 24 + 15: every lookup now needs a reviewer
    report = simulate(snapshot=snapshot)
    assert pairs(report.by_tool["orders.lookup"]) == {("allow", "ask"): 5}

    PolicyEvaluation.objects.update(created_at="2020-01-01T00:00:00Z")
    report = simulate(days=30)
    assert (report.evaluated, report.moves, report.asks_per_day_before) == (0, [], 0.0)

    Rule.objects.create(
        name="typo", tool_patterns=["payments.refund"], outcome="ask", condition="args.amout > 1.0"
    )
    with pytest.raises(ValidationError) as error:
        simulate()
    assert "args.amout" in str(error.value)


def test_reviewer_load_counts_an_action_asked_again_on_resume_once(policy_gate):
    run_id = refund_runs()["A-1002"]  # the refund of 649 waits for finance
    request = ApprovalRequest.objects.get(run_id=run_id)
    reviewer = get_user_model().objects.create_user("rae")
    ReviewerTeam.objects.create(name="finance").members.add(reviewer)
    approval_decide(request=request, reviewer=reviewer, verdict="approve")
    assert drive(run_id).status == "completed"
    refund = PolicyEvaluation.objects.filter(run_id=run_id, tool="payments.refund")
    assert list(refund.values_list("outcome", flat=True)) == ["ask", "ask"]  # decided again

    report = simulate()
    assert pairs(report.by_tool["payments.refund"]) == {  # every evaluation
        ("allow", "allow"): 3,
        ("ask", "ask"): 3,
    }
    assert report.asks_per_day_before == report.asks_per_day_after == 2 / 7  # every request
