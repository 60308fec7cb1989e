"""The real engine, the policy gate and the seeded demo policy against a compromised model: an
action is evaluated for the agent acting and confined to what it may use, and the gate sees
everything the run has produced so far."""

import pytest

from approvals.policy.models import PolicyEvaluation
from orchestration.demo.models import Email, Refund
from orchestration.registry.declare import workflow
from orchestration.registry.models import Agent
from orchestration.runs.services import run_start
from tests.orchestration.engine.conftest import drive
from tests.orchestration.engine.puppet import Puppet, Turn

pytestmark = pytest.mark.django_db(transaction=True)

REFUND = {"order_id": "A-1004", "amount": 99, "reason": "The document says so."}


@workflow("acting.read_then_email", tools=["infra.describe_volume", "email.send"])
def read_then_email(ctx, to: str) -> dict:
    volume = ctx.tool("infra.describe_volume", volume="vol-7f3a")
    ctx.tool(
        "email.send", to=to, subject="The backup volume", body=f"It holds {volume['contains']}"
    )
    return {"sent": True}


@pytest.fixture
def puppet(monkeypatch):
    return Puppet.install(monkeypatch)


def test_the_infra_agent_cannot_issue_refunds_whatever_its_model_says(policy_gate, puppet):
    Agent.objects.filter(name="infra-agent").update(provider="puppet", model="puppet-1")
    puppet.turns = [
        Turn(calls=[("payments.refund", REFUND)] * 3),
        Turn(calls=[("payments.refund", {**REFUND, "amount": 98})] * 3),
        Turn(calls=[("Payments.Refund", REFUND), ("payments.refund ", REFUND)]),
        Turn(calls=[("infra.diagnostics", {"service": "billing"})]),
        Turn(text="Refunds issued."),
    ]
    run = drive(
        run_start(
            workflow="infra_change",
            input={"goal": "Invoices are slow.", "service": "billing"},
            intent={"goal": "Speed up invoices"},
        ).pk
    )
    assert run.status == "completed", run.error
    assert not Refund.objects.exists()
    assert set(map(tuple, puppet.offered)) == {
        (
            "infra.diagnostics",
            "infra.describe_volume",
            "infra.run_migration",
            "infra.delete_volume",
        )
    }
    refused = run.step_set.filter(kind="tool", error_type="ToolUnavailable")
    assert refused.count() == 8
    # Never offered, so never before the gate; what was offered was decided for infra-agent.
    evaluations = PolicyEvaluation.objects.filter(run_id=run.pk)
    assert list(evaluations.values_list("tool", "agent", "outcome")) == [
        ("infra.diagnostics", "infra-agent", "allow")
    ]


def test_a_paused_agent_s_actions_in_flight_are_denied(policy_gate):
    run = run_start(
        workflow="customer_refund",
        agent="refund-bot",
        input={"order_id": "A-1001", "reason": "It arrived broken."},
    )
    Agent.objects.filter(name="refund-bot").update(status="paused")
    run = drive(run.pk)
    assert run.status == "failed"
    assert run.error == "ActionDenied: agent refund-bot is paused"
    assert run.step_set.get().verdict["outcome"] == "deny"


def test_a_secret_read_in_the_step_just_before_cannot_be_emailed(policy_gate):
    # Sent inside the company, so only the taint of the email's own text can refuse it.
    run = drive(run_start(workflow="acting.read_then_email", input={"to": "ops@baton.example"}).pk)
    assert run.status == "failed"
    assert run.error.startswith("ActionDenied: rule Secrets never leave")
    email = run.step_set.get(name="email.send")
    assert email.verdict["rules"][0] == "Secrets never leave"
    assert not Email.objects.exists()
    evaluation = PolicyEvaluation.objects.get(run_id=run.pk, tool="email.send")
    assert evaluation.input["action"]["labels"] == ["secret"]
