"""Policy decisions: the seeded demo policy, precedence, least privilege, canonical actions,
runtime errors, shadow rules and taint."""

import pytest
from django.core.exceptions import ValidationError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from approvals.policy.compiled import CompiledPolicy
from approvals.policy.decide import decide, decide_on
from approvals.policy.models import Rule
from approvals.policy.seed import policy_seed
from approvals.policy.services import grant_create, grant_revoke, policy_publish
from orchestration.canonical import action_hash
from orchestration.demo.seed import demo_data_seed
from orchestration.gate import Action
from orchestration.registry.models import Agent, Tool
from orchestration.runs.models import Run, Step

pytestmark = pytest.mark.django_db


@pytest.fixture
def demo():
    demo_data_seed()
    policy_seed()
    return {agent.name: agent for agent in Agent.objects.all()}


def run_for(agent, workflow="customer_refund", **intent) -> Run:
    return Run.objects.create(
        workflow=workflow,
        workflow_version=1,
        agent=agent,
        intent={"goal": "", "constraints": [], **intent},
        budgets={},
    )


def act(run, tool, *, seq=1, reasoning="", confidence=None, labels=(), **args):
    return decide(
        Action(
            tool=tool,
            args=args,
            run_id=run.pk,
            step_seq=seq,
            agent=run.agent.name if run.agent else None,
            reasoning=reasoning,
            confidence=confidence,
            labels=tuple(labels),
        ),
        run,
    )


def labelled_step(run, seq, output, labels):
    Step.objects.create(
        run=run,
        seq=seq,
        kind="tool",
        name="x",
        status="completed",
        output=output,
        labels=labels,
        idempotency_key=f"k{run.pk}-{seq}",
    )


@pytest.mark.parametrize(
    ("agent", "tool", "args", "outcome", "why"),
    [
        ("refund-bot", "orders.lookup", {"order_id": "A-1001"}, "allow", "below"),
        (
            "refund-bot",
            "payments.refund",
            {"order_id": "A-1001", "amount": 89},
            "allow",
            "Small refunds within policy",
        ),
        (
            "refund-bot",
            "payments.refund",
            {"order_id": "A-1004", "amount": 1899},
            "ask",
            "Large refunds need finance",
        ),
        (
            "refund-bot",
            "payments.refund",
            {"order_id": "A-1003", "amount": 219},
            "allow",
            "Small refunds within policy",
        ),
        (
            "travel-agent",
            "travel.search_hotels",
            {"city": "Lisbon", "max_price": 200},
            "allow",
            "below",
        ),
        ("infra-agent", "infra.diagnostics", {"service": "billing"}, "allow", "below"),
        (
            "infra-agent",
            "infra.run_migration",
            {"service": "billing", "migration": "0042"},
            "ask",
            "Schema migrations need a second engineer",
        ),
        (
            "infra-agent",
            "infra.delete_volume",
            {"volume": "vol-7f3a"},
            "ask",
            "Volume deletions are confirmed first",
        ),
        (
            "travel-agent",
            "payments.refund",
            {"order_id": "A-1001", "amount": 5},
            "deny",
            "tool payments.refund is beyond the ceiling of agent travel-agent",
        ),
    ],
)
def test_verdicts_for_the_demo_tools(demo, agent, tool, args, outcome, why):
    decision = act(run_for(demo[agent]), tool, **args)
    assert decision.outcome == outcome
    assert why in decision.reason
    assert decision.policy_version == 1


def test_a_schema_migration_goes_to_operations_and_escalates_to_finance(demo):
    decision = act(
        run_for(demo["infra-agent"]), "infra.run_migration", service="billing", migration="0042"
    )
    assert decision.obligations["team"] == "operations"
    assert decision.obligations["escalation_team"] == "finance"
    assert decision.obligations["quorum"] == 1  # the agent proposes, one engineer seconds


def test_risk_factors_are_named_with_their_contribution(demo):
    run = run_for(demo["refund-bot"], labels=[])
    decision = act(run, "payments.refund", order_id="A-1004", amount=1899, confidence=0.5)
    factors = {f["name"]: f["points"] for f in decision.factors}
    assert factors == {
        "side effect": 20,
        "impact": 18,
        "irreversible": 15,
        "Refund above 500": 10,
        "low confidence": 10,
    }
    assert decision.score == 73


@pytest.mark.parametrize("status", ["suspended", "paused"])
def test_a_suspended_or_paused_agent_is_denied_everything(demo, status):
    agent = demo["refund-bot"]
    run = run_for(agent)
    agent.status = status  # while its run is in flight
    agent.save()
    decision = act(run, "orders.lookup", order_id="A-1001")
    assert (decision.outcome, decision.reason) == ("deny", f"agent refund-bot is {status}")


def acting(run, agent_name, tool, **args):
    return decide(Action(tool=tool, args=args, run_id=run.pk, step_seq=1, agent=agent_name), run)


def test_an_action_is_decided_for_the_agent_acting_not_the_run_s(demo):
    infra = demo["infra-agent"]
    run = run_for(None, workflow="infra_change")  # the demo's run without an agent
    diagnostics = acting(run, "infra-agent", "infra.diagnostics", service="billing")
    assert diagnostics.outcome == "allow"
    assert (diagnostics.agent_id, diagnostics.agent_name) == (infra.pk, "infra-agent")
    assert diagnostics.input["agent"]["name"] == "infra-agent"
    refund = acting(run, "infra-agent", "payments.refund", order_id="A-1001", amount=5)
    assert (refund.outcome, refund.reason) == (
        "deny",
        "tool payments.refund is not declared by workflow infra_change v1",
    )
    # Inside a run of refund-bot, infra-agent acts with its own rights, within the run's.
    refunds = run_for(demo["refund-bot"])
    assert acting(
        refunds, "infra-agent", "payments.refund", order_id="A-1001", amount=5
    ).reason == ("tool payments.refund is beyond the ceiling of agent infra-agent")
    assert acting(refunds, "infra-agent", "infra.diagnostics", service="billing").reason == (
        "tool infra.diagnostics is beyond the ceiling of agent refund-bot, whose run this is"
    )
    infra.status = "paused"
    infra.save()
    assert acting(run, "infra-agent", "infra.diagnostics", service="b").reason == (
        "agent infra-agent is paused"
    )
    assert acting(run, "ghost", "infra.diagnostics", service="b").reason == "agent ghost is unknown"


def test_the_acting_agent_needs_its_ceiling_as_well_as_a_grant(demo):
    agent = demo["refund-bot"]
    grant_create(agent=agent, tool_pattern="*", by="policy")  # a grant wider than the ceiling
    run = run_for(agent)
    decision = act(run, "infra.delete_volume", volume="vol-7f3a")
    assert (decision.outcome, decision.reason) == (
        "deny",
        "tool infra.delete_volume is beyond the ceiling of agent refund-bot",
    )


def test_a_workflow_without_an_agent_may_use_only_the_tools_it_declares(demo):
    run = run_for(None)  # customer_refund declares orders.lookup, payments.refund, email.send
    assert act(run, "orders.lookup", order_id="A-1001").outcome == "allow"
    decision = act(run, "infra.delete_volume", volume="vol-7f3a")
    assert (decision.outcome, decision.reason) == (
        "deny",
        "tool infra.delete_volume is not declared by workflow customer_refund v1",
    )
    assert (decision.agent_id, decision.agent_name) == (None, "")
    handed = run_for(demo["travel-agent"])
    Run.objects.filter(pk=handed.pk).update(allowed_tools=["travel.search_hotels"])
    handed.refresh_from_db()
    assert act(handed, "travel.book", hotel="x", guest="y").reason == (
        f"tool travel.book is not among the tools handed to run {handed.pk}"
    )


def test_grants_expire_are_revoked_and_can_be_scoped_to_a_run(demo):
    agent = demo["travel-agent"]
    agent.tools.add(Tool.objects.get(name="orders.lookup"))  # within its ceiling, not granted
    run = run_for(agent)
    denied = act(run, "orders.lookup", order_id="A-1001")
    assert (denied.outcome, denied.reason) == (
        "deny",
        "tool orders.lookup is not granted to agent travel-agent",
    )
    grant = grant_create(agent=agent, tool_pattern="orders.*", by="policy", run_id=run.pk)
    assert act(run, "orders.lookup", order_id="A-1001").outcome == "allow"
    assert act(run_for(agent), "orders.lookup", order_id="A-1001").outcome == "deny"  # other run
    grant_revoke(grant=grant, by="policy")
    assert act(run, "orders.lookup", order_id="A-1001").outcome == "deny"


def test_a_grant_condition_narrows_the_tool(demo):
    agent = demo["travel-agent"]
    agent.tools.add(Tool.objects.get(name="orders.lookup"))
    grant_create(
        agent=agent,
        tool_pattern="orders.lookup",
        by="policy",
        condition='args.order_id == "A-1002"',
    )
    run = run_for(agent)
    assert act(run, "orders.lookup", order_id="A-1002").outcome == "allow"
    assert act(run, "orders.lookup", order_id="A-1001").outcome == "deny"


def test_a_violated_run_boundary_is_a_deny_naming_it(demo):
    run = run_for(demo["refund-bot"], boundaries=["!has(args.amount) || args.amount < 150.0"])
    decision = act(run, "payments.refund", order_id="A-1004", amount=1899)
    assert decision.outcome == "deny"
    assert "!has(args.amount) || args.amount < 150.0" in decision.reason
    assert act(run, "orders.lookup", order_id="A-1001").outcome == "allow"


def test_taint_a_secret_read_earlier_cannot_be_emailed(demo):
    agent = demo["refund-bot"]
    run = run_for(agent)
    labelled_step(run, 1, {"contains": "postgres://billing:hunter22@db/billing"}, ["secret"])
    decision = act(
        run,
        "email.send",
        seq=2,
        to="partner@baton.example",
        subject="Backup",
        body="Here it is: postgres://billing:hunter22@db/billing",
    )
    assert (decision.outcome, decision.reason) == ("deny", "rule Secrets never leave")
    assert decision.input["action"]["labels"] == ["secret"]
    clean = act(run, "email.send", seq=3, to="partner@baton.example", subject="Hi", body="Hi")
    assert clean.input["action"]["labels"] == []  # it does not carry the secret ...
    assert clean.outcome == "deny"  # ... but the run touched it: a secret may hide in any form


def test_equivalent_arguments_have_one_hash_and_different_ones_differ():
    a = action_hash("email.send", {"to": " a@b.example", "n": 1.0, "s": "cafe\u0301"})
    b = action_hash("email.send", {"s": "caf\u00e9", "n": 1, "to": "a@b.example "})
    assert a == b
    assert a != action_hash("email.send", {"to": "a@b.example", "n": 2, "s": "café"})


@given(
    args=st.dictionaries(
        st.text("abcdefgh", min_size=1, max_size=5),
        st.one_of(st.integers(-1000, 1000), st.text("xyz éü", max_size=10)),
        max_size=4,
    )
)
def test_the_hash_ignores_key_order_and_number_form(args):
    reordered = dict(reversed(list(args.items())))
    as_floats = {k: float(v) if isinstance(v, int) else v for k, v in args.items()}
    assert (
        action_hash("t.x", args) == action_hash("t.x", reordered) == action_hash("t.x", as_floats)
    )


POLICY_CONTEXT = {
    "action": {
        "tool": "email.send",
        "args": {"to": "x@evil.example", "cc": {"to": "ops@baton.example"}},
        "hash": "h",
        "labels": [],
        "reasoning": "",
        "confidence": -1.0,
    },
    "tool": {
        "name": "email.send",
        "side_effect": "external_send",
        "impact": 2,
        "reversible": False,
        "labels_read": [],
        "labels_produced": [],
    },
    "agent": {
        "name": "bot",
        "autonomy": "trusted",
        "status": "active",
        "record": {"actions": 0, "reject_rate": 0.0, "error_rate": 0.0},
    },
    "run": {
        "id": 1,
        "workflow": "w",
        "intent": {"goal": "", "constraints": []},
        "boundaries": [],
        "labels": [],
        "cost_usd": 0.0,
        "steps": 0,
    },
    "now": "2026-11-21T12:00:00+00:00",
}


def policy_of(*rules, thresholds=None) -> CompiledPolicy:
    return CompiledPolicy(
        7,
        {
            "rules": [
                {
                    "id": i,
                    "name": f"r{i}",
                    "mode": r.get("mode", "enforce"),
                    "priority": i,
                    "tool_patterns": r.get("tools", []),
                    "condition": r["condition"],
                    "outcome": r["outcome"],
                    "obligations": {},
                }
                for i, r in enumerate(rules)
            ],
            "thresholds": thresholds
            or {"trusted": {"allow_below": 0, "deny_above": 100, "quorum2_above": 100}},
        },
    )


def decide_context(policy, **overrides):
    context = {**POLICY_CONTEXT, **overrides}
    context["args"] = context["action"]["args"]
    return decide_on(context, policy)


def test_nested_field_smuggling_cannot_match_an_allow_rule():
    policy = policy_of({"condition": 'args.to == "ops@baton.example"', "outcome": "allow"})
    assert decide_context(policy).outcome == "ask"  # the nested cc.to authorises nothing


@given(
    st.permutations(["allow", "ask", "deny", "allow", "ask"]).flatmap(
        lambda outcomes: st.tuples(st.just(outcomes), st.integers(1, 5))
    )
)
@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_deny_beats_ask_beats_allow_in_any_order(case):
    outcomes, n = case
    chosen = outcomes[:n]
    policy = policy_of(*[{"condition": "true", "outcome": o} for o in chosen])
    expected = "deny" if "deny" in chosen else "ask" if "ask" in chosen else "allow"
    assert decide_context(policy).outcome == expected


def test_an_erroring_rule_falls_to_its_own_or_a_stricter_outcome():
    missing = "args.amount > 5.0"  # email.send has no amount: the evaluation errors
    for outcome, expected in [("allow", "ask"), ("ask", "ask"), ("deny", "deny")]:
        decision = decide_context(policy_of({"condition": missing, "outcome": outcome}))
        assert decision.outcome == expected
        assert decision.errors and "amount" in decision.errors[0]["error"]


def test_shadow_rules_are_recorded_and_never_change_the_outcome():
    policy = policy_of(
        {"condition": "true", "outcome": "deny", "mode": "shadow"},
        {"condition": "true", "outcome": "allow"},
    )
    decision = decide_context(policy)
    assert decision.outcome == "allow"
    assert decision.shadow_rules == ["r0"] and decision.rules == ["r1"]


def test_a_misspelled_field_is_refused_at_publish(demo):
    Rule.objects.create(
        name="typo",
        tool_patterns=["payments.refund"],
        outcome="ask",
        condition="args.amout > 500.0",
    )
    with pytest.raises(ValidationError) as error:
        policy_publish(by="policy")
    assert "args.amout" in str(error.value) and "args.amount" in str(error.value)
