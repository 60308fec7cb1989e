"""The demo domain end to end on the allow-all gate: seed, run the three workflows in-process."""

import json

import pytest
from django.core.management import CommandError, call_command

from orchestration.demo.models import Booking, Email, Hotel, InfraChange, Refund
from orchestration.demo.seed import demo_data_seed, demo_runs_seed
from orchestration.registry.models import Agent, Tool
from orchestration.runs.models import Run
from tests.orchestration.engine.conftest import drive

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _seeded():
    demo_data_seed()  # on the allow-all gate of the tests; tests/approvals/policy cover the policy


def test_seeding_is_idempotent_and_agents_get_their_ceilings():
    demo_data_seed()
    assert Agent.objects.count() == 3
    refund_bot = Agent.objects.get(name="refund-bot")
    assert sorted(refund_bot.tools.values_list("name", flat=True)) == [
        "email.send",
        "orders.lookup",
        "payments.refund",
    ]
    assert Tool.objects.get(name="payments.refund").side_effect == "payment"


def test_the_three_first_runs_complete_with_a_story_to_read():
    runs = demo_runs_seed()
    assert demo_runs_seed() == []  # only once
    finished = {run.workflow: drive(run.pk) for run in runs}
    assert {w: r.status for w, r in finished.items()} == {
        "customer_refund": "completed",
        "travel_booking": "completed",
        "infra_change": "completed",
    }

    refund = finished["customer_refund"]
    assert refund.result["refunded"] == 649.0
    assert Refund.objects.get().amount == 649 and Email.objects.count() == 1
    kinds = [s.kind for s in refund.step_set.order_by("seq")]
    assert kinds == ["tool", "retrieve", "llm", "check", "tool", "tool"]
    decision = refund.step_set.get(kind="llm").output["parsed"]
    assert decision["rationale"].startswith("The policy says: Refunds are allowed within 30 days")
    assert refund.step_set.get(kind="retrieve").labels == ["untrusted_input"]

    travel = finished["travel_booking"]
    messages = list(travel.events.values_list("message", flat=True))
    assert "Check 'Casa do Mar available' failed. rerouting to the next alternative" in messages
    booking = Booking.objects.get()
    assert booking.hotel.name == travel.result["booking"]["hotel"] != "Casa do Mar"
    assert Hotel.objects.get(name=booking.hotel.name).rooms_left == 3  # one room taken

    infra = finished["infra_change"]
    assert sorted(InfraChange.objects.values_list("kind", flat=True)) == [
        "delete_volume",
        "migration",
    ]
    turns = infra.step_set.filter(kind="llm").count()
    assert turns == 5  # four tool calls, then the answer
    reasoning = infra.step_set.filter(kind="tool").first().input["reasoning"]
    assert "Invoices are slow" in reasoning


def test_run_workflow_command_starts_a_run_and_refuses_bad_input(capsys):
    call_command(
        "run_workflow",
        "customer_refund",
        "--input",
        json.dumps({"order_id": "A-1002", "reason": "Broken on arrival"}),
        "--agent",
        "refund-bot",
    )
    run = Run.objects.get()
    assert f"Started run {run.pk} of customer_refund v1." in capsys.readouterr().out
    assert run.agent.name == "refund-bot"
    with pytest.raises(CommandError, match="order_id: 'nope' does not match"):
        call_command(
            "run_workflow", "customer_refund", "--input", '{"order_id": "nope", "reason": "x y z"}'
        )
    with pytest.raises(CommandError, match="--input is not JSON"):
        call_command("run_workflow", "customer_refund", "--input", "{")
    with pytest.raises(CommandError, match="No workflow named 'nope'"):
        call_command("run_workflow", "nope")


def test_demo_traffic_starts_runs_of_every_workflow():
    call_command("demo_traffic", "--rate", "6000", "--count", "3", "--seed", "1")
    assert sorted(Run.objects.values_list("workflow", flat=True)) == [
        "customer_refund",
        "infra_change",
        "travel_booking",
    ]
    with pytest.raises(CommandError, match="--rate must be above 0"):
        call_command("demo_traffic", "--rate", "0")


def test_a_refused_confirmation_email_leaves_the_refund_done(settings):
    from orchestration.gate import Verdict
    from orchestration.runs.services import run_start
    from tests.gates import ScriptedGate

    settings.BATON_GATE = "tests.gates.ScriptedGate"
    ScriptedGate.reset()
    ScriptedGate.verdicts = {"email.send": Verdict("deny", reason="no customer emails today")}
    run = drive(
        run_start(
            workflow="customer_refund",
            agent="refund-bot",
            input={"order_id": "A-1001", "reason": "It arrived broken."},
        ).pk
    )
    assert run.status == "completed"
    assert run.result["customer_emailed"] is False
    assert "no customer emails today" in run.result["note"]
    assert Refund.objects.get().amount == 89 and not Email.objects.exists()
