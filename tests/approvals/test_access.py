"""Team boundaries hold wherever a request shows or can be acted on, runs included: a reviewer
of another team sees that a gated step happened, never its arguments, reasoning, verdict or
log (run page, timeline fragment, run socket); may not halt a run that waits on a request they
may not decide; and may not list or revoke the "allow similar" grants made on it. Policy admins
may do all of it, and so may the request's own team."""

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.urls import reverse

from approvals.access import RunAccess, grants_visible_to, has_role, visible_to
from approvals.policy.models import Grant
from approvals.policy.services import grant_revoke
from approvals.queue.models import ApprovalRequest, RequestStatus
from approvals.roles import AUDITOR, MANAGE_POLICY, POLICY_ADMIN, REVIEW
from config.asgi import application
from orchestration.ledger.models import AuditRecord
from orchestration.registry.models import Agent
from orchestration.runs.models import Event, Run, RunStatus, Step
from orchestration.runs.realtime import run_group
from orchestration.runs.selectors import concealed
from orchestration.runs.services import run_halt
from tests.approvals.conftest import client_for, member

ARGS = {"order_id": "A-1004", "amount": 1899.5}
AMOUNT = "1899.5"
REASONING = "The blender arrived broken"
PROPOSAL = "I will refund the blender in full"
VERDICT = "Large refunds need finance"
HIDDEN = "are for the finance team"
HX = {"HTTP_HX_REQUEST": "true"}


def refund_run(team: str = "finance", parent: Run | None = None) -> tuple[Run, ApprovalRequest]:
    """A run waiting on a refund its agent proposed (a model call, then the gated tool call),
    and the open request for ``team``, as the engine and the gate leave them."""
    owner, _ = get_user_model().objects.get_or_create(username="owner")
    agent, _ = Agent.objects.get_or_create(name="bot", defaults={"owner": owner})
    run = Run.objects.create(
        workflow="customer_refund",
        workflow_version=1,
        agent=agent,
        status=RunStatus.WAITING,
        input={"order_id": "A-1004"},
        parent=parent,
        parent_step_seq=1 if parent else None,
    )
    call = {"name": "payments.refund", "arguments": ARGS, "reasoning": PROPOSAL}
    Step.objects.create(
        run=run, seq=1, kind="llm", name="model", status="completed",
        input={"provider": "scripted", "messages": [{"role": "user", "content": "Refund it"}]},
        output={"text": "Refunding.", "tool_calls": [call]},
    )  # fmt: skip
    Step.objects.create(
        run=run, seq=2, kind="tool", name="payments.refund", status="waiting",
        input={"args": ARGS, "reasoning": REASONING, "confidence": 0.8},
        verdict={"outcome": "ask", "reason": VERDICT, "score": 72},
    )  # fmt: skip
    Event.objects.create(run=run, step_seq=1, kind="llm.completed", message="Refunding.")
    Event.objects.create(
        run=run, step_seq=2, kind="tool.proposed", message=f"Reasoning: {REASONING}"
    )
    Event.objects.create(run=run, step_seq=2, kind="verdict.pending", message=f"Asked: {VERDICT}")
    request = ApprovalRequest.objects.create(
        run_id=run.pk, step_seq=2, agent="bot", tool="payments.refund", args=ARGS,
        reasoning=REASONING, team=team, verdict={"outcome": "ask", "reason": VERDICT},
    )  # fmt: skip
    return run, request


def run_page(account, run: Run) -> str:
    return client_for(account).get(f"/runs/{run.pk}/").content.decode()


def reads_the_request(html: str) -> bool:
    return any(secret in html for secret in (AMOUNT, REASONING, PROPOSAL, VERDICT))


@pytest.fixture
def people(db):
    return {
        "finance": member("fin", "finance"),
        "operations": member("ops", "operations"),
        "admin": member("pol", role=POLICY_ADMIN),
        "auditor": member("aud", role=AUDITOR),
    }


# --- seeing -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/runs/{}/", "/runs/{}/timeline/"])
def test_another_team_sees_that_the_step_happened_not_what_it_carries(people, path):
    run, _ = refund_run()
    url = path.format(run.pk)
    for outsider in ("operations",):
        html = client_for(people[outsider]).get(url).content.decode()
        assert 'id="step-2"' in html and "payments.refund" in html  # it happened
        assert HIDDEN in html
        assert not reads_the_request(html), outsider  # args, reasoning, proposal, verdict, log
    for insider in ("finance", "admin", "auditor"):
        html = client_for(people[insider]).get(url).content.decode()
        assert reads_the_request(html) and HIDDEN not in html, insider
        assert AMOUNT in html and REASONING in html and VERDICT in html


def test_a_finance_reviewer_does_not_read_an_operations_request(people):
    run, _ = refund_run(team="operations")
    html = run_page(people["finance"], run)
    assert "are for the operations team" in html and not reads_the_request(html)
    assert reads_the_request(run_page(people["operations"], run))


def test_a_request_page_shows_the_runs_other_teams_steps_only_as_having_happened(people):
    """The request page carries the run's timeline: an operations request in a run that also
    waits on finance shows the finance step, not what it carries."""
    run, _ = refund_run(team="finance")
    Step.objects.create(
        run=run, seq=3, kind="tool", name="email.send", status="waiting",
        input={"args": {"to": "ops@baton.example"}, "reasoning": "Tell operations"},
    )  # fmt: skip
    ops_request = ApprovalRequest.objects.create(
        run_id=run.pk, step_seq=3, agent="bot", tool="email.send",
        args={"to": "ops@baton.example", "subject": "Refund", "body": "Refund pending"},
        team="operations", verdict={"outcome": "ask"},
    )  # fmt: skip
    url = reverse("approvals:request", kwargs={"request_id": ops_request.pk})
    html = client_for(people["operations"]).get(url).content.decode()
    assert "ops@baton.example" in html  # its own request
    assert HIDDEN in html and not reads_the_request(html)
    both = member("both", "finance", "operations")
    assert reads_the_request(client_for(both).get(url).content.decode())


def test_a_team_less_request_is_everyones_and_an_escalated_one_its_escalation_teams(people):
    run, request = refund_run(team="")
    assert reads_the_request(run_page(people["operations"], run))
    ApprovalRequest.objects.filter(pk=request.pk).update(
        team="finance",
        status=RequestStatus.ESCALATED,
        obligations={"escalation_team": "operations"},
    )
    assert RunAccess().hidden_steps(people["operations"], run) == {}
    assert RunAccess().hidden_steps(people["finance"], run) == {}
    other = member("other", "legal")
    assert RunAccess().hidden_steps(other, run) == {2: "the finance team"}


def test_model_calls_from_the_proposal_on_carry_the_hidden_step():
    steps = {seq: Step(seq=seq, kind=kind) for seq, kind in enumerate(
        ["now", "llm", "tool", "llm", "tool", "llm"], start=1
    )}  # fmt: skip
    # step 5 is hidden: the model call that proposed it (4) and every later one (6) carry it
    assert concealed(steps, {5: "finance"}) == {4: "finance", 5: "finance", 6: "finance"}
    # step 3 is hidden: 2 proposed it; 4 and 6 repeat the conversation; 5 is not hidden
    assert set(concealed(steps, {3: "x"})) == {2, 3, 4, 6}
    assert concealed(steps, {}) == {}


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_the_run_socket_renders_for_each_viewers_teams():
    @database_sync_to_async
    def setup() -> tuple[Run, str, str]:
        run, _ = refund_run()
        cookies = []
        for account in (member("ws-fin", "finance"), member("ws-ops", "operations")):
            client = client_for(account)
            cookies.append(f"sessionid={client.cookies['sessionid'].value}")
        return run, *cookies

    run, fin_cookie, ops_cookie = await setup()
    sockets = {}
    for name, cookie in (("finance", fin_cookie), ("operations", ops_cookie)):
        headers = [(b"host", b"127.0.0.1:8000"), (b"origin", b"http://127.0.0.1:8000")]
        ws = WebsocketCommunicator(
            application, f"/ws/runs/{run.pk}/", headers=[*headers, (b"cookie", cookie.encode())]
        )
        assert (await ws.connect())[0]
        sockets[name] = ws
    first = {name: await ws.receive_from(timeout=3) for name, ws in sockets.items()}
    assert reads_the_request(first["finance"]) and HIDDEN not in first["finance"]
    assert HIDDEN in first["operations"] and not reads_the_request(first["operations"])

    # a change re-renders each socket for its own viewer
    await database_sync_to_async(Step.objects.filter(run=run, seq=2).update)(
        status="completed", output={"refund_id": "R-77", "amount": 1899.5}
    )
    await get_channel_layer().group_send(
        run_group(run.pk), {"type": "run.changed", "run_id": run.pk}
    )
    update = {name: await ws.receive_from(timeout=3) for name, ws in sockets.items()}
    assert "R-77" in update["finance"]
    assert 'id="step-2"' in update["operations"]  # its status changed, in place
    assert "R-77" not in update["operations"] and not reads_the_request(update["operations"])
    for ws in sockets.values():
        await ws.disconnect()


# --- halting ------------------------------------------------------------------------------


def _unchanged(run: Run, request: ApprovalRequest) -> bool:
    run.refresh_from_db()
    request.refresh_from_db()
    return (
        run.status == RunStatus.WAITING
        and request.status == RequestStatus.PENDING
        and not AuditRecord.objects.filter(verb="run.halted", run_id=run.pk).exists()
        and not Event.objects.filter(run=run, kind="run.halted").exists()
    )


def test_another_team_may_not_halt_a_run_waiting_on_its_request(people):
    run, request = refund_run()
    client = client_for(people["operations"])
    page = client.get(f"/runs/{run.pk}/").content.decode()
    assert "Halt run" not in page
    assert "This run waits on a request for the finance team" in page

    response = client.post(f"/runs/{run.pk}/halt/", {"reason": "Looks wrong"})
    assert response.status_code == 403
    assert "waits on a request for the finance team" in response.content.decode()
    partial = client.post(f"/runs/{run.pk}/halt/", {"reason": "Looks wrong"}, **HX)
    assert partial.status_code == 403 and 'role="alert"' in partial.content.decode()
    assert _unchanged(run, request)

    with pytest.raises(PermissionDenied):  # the service asks again, with the run locked
        run_halt(run=run.pk, by=people["operations"], reason="Looks wrong")
    assert _unchanged(run, request)


def test_halting_a_parent_would_close_its_handoffs_request_so_it_is_refused(people):
    parent = Run.objects.create(workflow="triage", workflow_version=1, status=RunStatus.WAITING)
    child, request = refund_run(parent=parent)
    response = client_for(people["operations"]).post(f"/runs/{parent.pk}/halt/", {"reason": "x"})
    assert response.status_code == 403
    assert f"Its handoff run {child.pk} waits on a request for the finance team" in (
        response.content.decode()
    )
    assert _unchanged(child, request)
    parent.refresh_from_db()
    assert parent.status == RunStatus.WAITING


@pytest.mark.parametrize("who", ["finance", "admin"])
def test_the_requests_team_and_policy_admins_may_halt(people, who):
    run, _ = refund_run()
    client = client_for(people[who])
    assert "Halt run" in client.get(f"/runs/{run.pk}/").content.decode()
    response = client.post(f"/runs/{run.pk}/halt/", {"reason": "Wrong customer"})
    assert response.status_code == 302
    run.refresh_from_db()
    assert run.status == RunStatus.HALTED and run.halted_by == people[who].username


def test_a_decided_request_no_longer_holds_the_run(people):
    run, request = refund_run()
    ApprovalRequest.objects.filter(pk=request.pk).update(status=RequestStatus.REJECTED)
    assert RunAccess().halt_refusal(people["operations"], run) == ""
    assert RunAccess().hidden_steps(people["operations"], run) == {2: "the finance team"}


# --- "allow similar" grants ---------------------------------------------------------------


def similar_grant(run: Run, request: ApprovalRequest, by) -> Grant:
    return Grant.objects.create(
        agent=run.agent, tool_pattern="payments.refund", condition='args.order_id == "A-1004"',
        run_id=run.pk, max_uses=10, source="reviewer", created_by=by, request=request,
    )  # fmt: skip


def test_another_team_neither_lists_nor_revokes_a_teams_grants(people):
    run, request = refund_run()
    grant = similar_grant(run, request, people["finance"])
    listing = reverse("approvals:run_grants", args=[run.pk])
    revoke = reverse("approvals:grant_revoke", args=[grant.pk])
    row = f'id="run-grant-{grant.pk}"'

    ops = client_for(people["operations"])
    assert row not in ops.get(listing, **HX).content.decode()
    assert ops.post(revoke, {"run_id": run.pk}, **HX).status_code == 403
    with pytest.raises(PermissionDenied):
        grant_revoke(grant=grant, by=people["operations"])
    grant.refresh_from_db()
    assert grant.revoked_at is None
    assert not AuditRecord.objects.filter(verb="grant.revoked").exists()

    assert row in client_for(people["admin"]).get(listing, **HX).content.decode()
    fin = client_for(member("fin2", "finance"))  # the team, not only the grant's maker
    assert row in fin.get(listing, **HX).content.decode()
    assert fin.post(revoke, {"run_id": run.pk}, **HX).status_code == 200
    grant.refresh_from_db()
    assert grant.revoked_by == "fin2"


def test_a_grant_without_its_request_is_its_makers_and_policy_admins(people):
    run, _ = refund_run()
    grant = similar_grant(run, None, people["finance"])
    assert grant in grants_visible_to(people["finance"])
    assert grant in grants_visible_to(people["admin"])
    assert grant not in grants_visible_to(member("fin2", "finance"))
    assert grant not in grants_visible_to(people["auditor"])


def test_roles_are_checked_in_one_place(people):
    assert has_role(people["finance"], REVIEW) and not has_role(people["finance"], MANAGE_POLICY)
    people["finance"].is_active = False
    assert not has_role(people["finance"], REVIEW)
    access = RunAccess()
    assert access.can_view(people["auditor"]) and not access.can_halt(people["auditor"])
    assert access.can_operate(people["admin"]) and not access.can_operate(people["operations"])
    assert not access.can_view(member("nobody", role=None))


def test_the_run_page_offers_the_control_planes_links_by_role(people):
    """The run page's template names nothing of approvals: RunAccess offers these."""
    run, _ = refund_run()
    grants = reverse("approvals:run_grants", args=[run.pk])
    audit = reverse("approvals:audit_run", args=[run.pk])
    html = run_page(people["auditor"], run)
    assert f'href="{audit}"' in html and grants not in html
    html = run_page(people["operations"], run)
    assert f'hx-get="{grants}"' in html and audit not in html


# --- one step aside: outcomes, superseded requests, handoffs, separation of duties ---------


def test_a_runs_outcome_is_withheld_from_a_team_a_step_of_it_is_hidden_from(people):
    run, _ = refund_run()
    Run.objects.filter(pk=run.pk).update(status=RunStatus.COMPLETED, result={"refunded": 1899.5})
    html = run_page(people["operations"], run)
    assert "Its outcome carries steps that are for the finance team" in html
    assert AMOUNT not in html
    assert AMOUNT in run_page(people["finance"], run)


def test_a_request_is_hidden_when_another_request_of_its_step_is(people):
    """A team-less request superseded by a finance one carries what finance's hides."""
    run, renewed = refund_run(team="finance")
    old = ApprovalRequest.objects.create(
        run_id=run.pk, step_seq=2, agent="bot", tool="payments.refund", args=ARGS,
        team="", status=RequestStatus.SUPERSEDED, verdict={"outcome": "ask"},
    )  # fmt: skip
    ops, fin = people["operations"], people["finance"]
    assert not visible_to(ops).filter(pk=old.pk).exists()
    assert set(visible_to(fin).filter(run_id=run.pk)) == {old, renewed}
    url = reverse("approvals:request", kwargs={"request_id": old.pk})
    assert client_for(ops).get(url).status_code == 403
    assert client_for(fin).get(url).status_code == 200


def test_a_handoff_step_is_hidden_when_its_child_run_holds_another_teams_request(people):
    parent, _ = refund_run(team="")
    Step.objects.create(
        run=parent, seq=3, kind="handoff", name="handoff to bot", status="completed",
        input={"goal": "refund"}, output={"refunded": 1899.5},
    )  # fmt: skip
    child, _ = refund_run(team="finance", parent=parent)
    Run.objects.filter(pk=child.pk).update(parent_step_seq=3)
    assert RunAccess().hidden_steps(people["operations"], parent) == {3: "the finance team"}
    assert AMOUNT not in run_page(people["operations"], parent).split('id="step-3"')[1]
    assert RunAccess().hidden_steps(people["finance"], parent) == {}


def test_the_owner_of_the_agent_acting_and_the_starter_of_a_parent_run_cannot_approve(people):
    from approvals.queue.services import approval_decide

    starter = member("starter", "finance")
    parent, _ = refund_run(team="")
    Run.objects.filter(pk=parent.pk).update(started_by=starter)
    _child, request = refund_run(team="finance", parent=parent)
    hal = member("hal", "finance")
    Agent.objects.create(name="helper", owner=hal)
    ApprovalRequest.objects.filter(pk=request.pk).update(agent="helper")  # a nested loop's
    for who in (hal, starter):
        with pytest.raises(PermissionDenied):
            approval_decide(request=request.pk, reviewer=who, verdict="approve")
    decided = approval_decide(request=request.pk, reviewer=people["finance"], verdict="approve")
    assert decided.status == RequestStatus.APPROVED
