"""The queue page and the request page: visibility, htmx partials, claims, decisions and their
conflicts (409), invalid input (422) and refusals (403), each answered with a fragment."""

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from approvals.queue.models import ApprovalRequest, Decision, RequestKind
from approvals.queue.selectors import request_snapshot, summary
from approvals.roles import AUDITOR
from orchestration.canonical import action_hash
from orchestration.ledger.models import AuditRecord
from orchestration.registry.models import Agent
from orchestration.runs.models import Run
from tests.approvals.conftest import client_for, member

pytestmark = pytest.mark.django_db

HX = {"HTTP_HX_REQUEST": "true"}


def make_run():
    owner = get_user_model().objects.create_user(f"owner-{Run.objects.count()}")
    agent, _ = Agent.objects.get_or_create(name="bot", defaults={"owner": owner})
    return Run.objects.create(
        workflow="customer_refund",
        workflow_version=1,
        agent=agent,
        budgets={},
        intent={"goal": "Refund order A-1004", "constraints": ["amount <= 2000"]},
    )


def make_request(run=None, *, seq=1, team="finance", args=None, score=72, minutes=30, **extra):
    run = run or make_run()
    args = args or {"order_id": "A-1004", "amount": 1899}
    fields = dict(
        run_id=run.pk,
        step_seq=seq,
        agent="bot",
        tool="payments.refund",
        args=args,
        action_hash=action_hash("payments.refund", args),
        reasoning="The customer's blender arrived broken.",
        confidence=0.82,
        team=team,
        deadline=timezone.now() + timedelta(minutes=minutes),
        risk_score=score,
        verdict={
            "outcome": "ask",
            "reason": "Check the order first.",
            "score": score,
            "factors": [{"name": "irreversible", "points": 20, "detail": ""}],
            "rules": ["Large refunds need finance"],
            "policy_version": 3,
        },
    )
    fields.update(extra)
    return ApprovalRequest.objects.create(**fields)


def shown(request: ApprovalRequest, **data) -> dict:
    """A decision's form data, with the action hash the request page showed."""
    return {"action_hash": request.action_hash, **data}


@pytest.fixture
def fin():
    return member("fin", "finance")


def test_summary_is_one_line_of_tool_and_arguments():
    request = make_request()
    assert summary(request) == "payments.refund: order_id A-1004, amount 1899"


def test_the_queue_lists_the_reviewers_open_requests_by_deadline_then_risk(fin):
    run = make_run()
    later = make_request(run, seq=1, minutes=50, score=90)
    sooner_low = make_request(run, seq=2, minutes=10, score=10)
    ops = make_request(run, seq=3, team="operations")
    question = make_request(
        run, seq=4, kind=RequestKind.QUESTION, tool="", args={}, question="Ship or wait?",
        choices=["ship", "wait"], minutes=20, team="",
    )  # fmt: skip
    make_request(run, seq=5, status="approved", decided_by="dana")

    response = client_for(fin).get(reverse("approvals:queue"))

    assert response.status_code == 200
    html = response.content.decode()
    assert "<html" in html and 'ws-connect="/ws/approvals/"' in html
    order = [f'id="req-{r.pk}"' for r in (sooner_low, question, later)]
    assert [html.index(o) for o in order] == sorted(html.index(o) for o in order)
    assert f'id="req-{ops.pk}"' not in html
    assert "payments.refund: order_id A-1004, amount 1899" in html
    assert "Ship or wait?" in html and "90 · high" in html and "10 · low" in html
    assert "data-deadline=" in html and "in 9" in html  # "in 9 minutes", server-rendered
    assert "<strong>3</strong> open" in html


def test_the_queue_partial_and_filters(fin):
    run = make_run()
    high = make_request(run, seq=1, score=80)
    low = make_request(run, seq=2, score=5, tool="email.send", args={"to": "c@example.com"})
    client = client_for(fin)
    response = client.get(reverse("approvals:queue") + "?risk=high", **HX)
    html = response.content.decode()
    assert "<html" not in html and html.lstrip().startswith('<div id="queue-live"')
    assert f'id="req-{high.pk}"' in html and f'id="req-{low.pk}"' not in html
    html = client.get(reverse("approvals:queue") + "?tool=email.send").content.decode()
    assert f'id="req-{low.pk}"' in html and f'id="req-{high.pk}"' not in html
    client.post(reverse("approvals:claim", args=[low.pk]))
    html = client.get(reverse("approvals:queue") + "?claim=mine").content.decode()
    assert f'id="req-{low.pk}"' in html and f'id="req-{high.pk}"' not in html
    html = client.get(reverse("approvals:queue") + "?claim=unclaimed").content.decode()
    assert f'id="req-{high.pk}"' in html and f'id="req-{low.pk}"' not in html


def test_other_roles_are_refused_and_other_teams_requests_are_403(fin):
    request = make_request()
    auditor = client_for(member("aud", role=AUDITOR))
    assert auditor.get(reverse("approvals:queue")).status_code == 403
    assert auditor.get(reverse("approvals:request", args=[request.pk])).status_code == 403
    ops = client_for(member("ops", "operations"))
    assert ops.get(reverse("approvals:request", args=[request.pk])).status_code == 403
    response = ops.post(reverse("approvals:decide", args=[request.pk]), {"verdict": "approve"})
    assert response.status_code == 403
    assert Client().get(reverse("approvals:queue")).status_code == 302  # to the login page


def test_the_request_page_shows_what_why_context_and_risk(fin):
    run = make_run()
    request = make_request(run)
    other = make_request(run, seq=2, args={"order_id": "A-1004", "amount": 5})
    html = client_for(fin).get(reverse("approvals:request", args=[request.pk])).content.decode()
    for text in (
        "payments.refund: order_id A-1004, amount 1899",
        "The customer&#x27;s blender arrived broken.",
        "0.82",
        "Refund order A-1004",
        "amount &lt;= 2000",
        "irreversible",
        "Large refunds need finance",
        "v3",
        f'href="/approvals/{other.pk}/"',
        f'ws-connect="/ws/runs/{run.pk}/"',
        f'ws-connect="/ws/approvals/{request.pk}/"',
        'id="run-timeline"',
    ):
        assert text in html, text
    for label in ("Claim", "Approve", "Edit &amp; approve", "Reject", "Halt run"):
        assert f">{label}</button>" in html, label


def test_claim_then_release_and_a_claim_held_by_another_is_409(fin):
    request = make_request()
    dana = member("dana", "finance")
    client = client_for(fin)
    response = client.post(reverse("approvals:claim", args=[request.pk]), **HX)
    assert response.status_code == 200 and ">Release</button>" in response.content.decode()
    response = client_for(dana).post(reverse("approvals:claim", args=[request.pk]), **HX)
    assert response.status_code == 409
    assert "claimed by fin" in response.content.decode()
    response = client_for(dana).post(
        reverse("approvals:decide", args=[request.pk]), shown(request, verdict="approve"), **HX
    )
    assert response.status_code == 409 and "claimed by fin" in response.content.decode()
    response = client.post(reverse("approvals:release", args=[request.pk]), **HX)
    assert response.status_code == 200 and ">Claim</button>" in response.content.decode()


def test_approve_records_the_snapshot_and_a_second_decision_is_409(fin):
    request = make_request()
    page = request_snapshot(request)  # what the page shows
    response = client_for(fin).post(
        reverse("approvals:decide", args=[request.pk]), shown(request, verdict="approve"), **HX
    )
    assert response.status_code == 200
    assert response.content.decode().lstrip().startswith('<div id="request-panel"')
    request.refresh_from_db()
    assert request.status == "approved" and request.decided_by == "fin"
    decision = Decision.objects.get(request=request)
    assert decision.snapshot == page
    assert decision.snapshot["summary"] == "payments.refund: order_id A-1004, amount 1899"

    late = client_for(member("dana", "finance")).post(
        reverse("approvals:decide", args=[request.pk]), shown(request, verdict="approve"), **HX
    )
    assert late.status_code == 409
    assert "already decided by fin" in late.content.decode()
    assert '<div id="request-panel"' in late.content.decode()


def test_edit_shows_errors_then_the_diff_then_decides(fin):
    request = make_request()
    url = reverse("approvals:decide", args=[request.pk])
    client = client_for(fin)
    bad = client.post(
        url, shown(request, verdict="edit", **{"arg-order_id": "A-1004", "arg-amount": "x"}), **HX
    )
    assert bad.status_code == 422 and "Enter a number." in bad.content.decode()
    data = shown(
        request, verdict="edit", confirm="0", **{"arg-order_id": "A-1004", "arg-amount": "80"}
    )
    preview = client.post(url, data, **HX)
    html = preview.content.decode()
    assert preview.status_code == 200 and "Confirm edit &amp; approve" in html
    assert "1899" in html and "80" in html and 'name="confirm" value="1"' in html
    request.refresh_from_db()
    assert request.status == "pending"
    done = client.post(url, {**data, "confirm": "1"}, **HX)
    assert done.status_code == 200
    request.refresh_from_db()
    assert request.status == "edited" and request.approved_args["amount"] == 80
    assert Decision.objects.get(request=request).diff == {"amount": [1899, 80]}


def test_reject_and_halt_need_a_reason(fin):
    request = make_request()
    url = reverse("approvals:decide", args=[request.pk])
    client = client_for(fin)
    for verdict in ("reject", "halt"):
        response = client.post(url, shown(request, verdict=verdict, comment=" "), **HX)
        assert response.status_code == 422
        assert "Say why" in response.content.decode()
    response = client.post(
        url, shown(request, verdict="reject", comment="Not this customer."), **HX
    )
    assert response.status_code == 200
    request.refresh_from_db()
    assert request.status == "rejected" and request.reason == "Not this customer."


def test_separation_of_duties_is_a_403_fragment(fin):
    run = make_run()
    Run.objects.filter(pk=run.pk).update(started_by=fin)
    request = make_request(run)
    response = client_for(fin).post(
        reverse("approvals:decide", args=[request.pk]), shown(request, verdict="approve"), **HX
    )
    assert response.status_code == 403
    assert "You started this run" in response.content.decode()


def test_questions_get_an_answer_form_with_choices(fin):
    request = make_request(
        kind=RequestKind.QUESTION, tool="", args={}, question="Ship or wait?",
        choices=["ship", "wait"],
    )  # fmt: skip
    client = client_for(fin)
    html = client.get(reverse("approvals:request", args=[request.pk])).content.decode()
    assert 'name="answer" value="ship"' in html and ">Approve</button>" not in html
    response = client.post(
        reverse("approvals:decide", args=[request.pk]),
        shown(request, verdict="answer", answer="wait"),
    )
    assert response.status_code == 302
    request.refresh_from_db()
    assert request.status == "approved" and request.answer == "wait"


# --- approve and allow similar; the run's reviewer grants -----------------------------------


SIMILAR_RUN = "Approve &amp; allow similar for this run"
SIMILAR_HOUR = "Approve &amp; allow similar for 1 hour"


def test_allow_similar_buttons_only_where_the_rule_permits_and_the_tool_allows(fin):
    from orchestration.registry.models import Tool

    client = client_for(fin)
    plain = make_request()
    html = client.get(reverse("approvals:request", args=[plain.pk])).content.decode()
    assert "Approve" in html and SIMILAR_RUN not in html and SIMILAR_HOUR not in html

    permitted = make_request(obligations={"allow_similar": True})
    html = client.get(reverse("approvals:request", args=[permitted.pk])).content.decode()
    assert SIMILAR_RUN in html and SIMILAR_HOUR in html
    assert (
        'name="allow_similar" value="run"' in html and 'name="allow_similar" value="hour"' in html
    )

    Tool.objects.update_or_create(
        name="payments.refund", defaults={"allow_similar_forbidden": True}
    )
    html = client.get(reverse("approvals:request", args=[permitted.pk])).content.decode()
    assert SIMILAR_RUN not in html and SIMILAR_HOUR not in html


@pytest.mark.parametrize("scope", ["run", "hour"])
def test_approve_and_allow_similar_creates_the_reviewers_grant(fin, scope):
    from approvals.policy.models import Grant

    request = make_request(obligations={"allow_similar": True})
    response = client_for(fin).post(
        reverse("approvals:decide", args=[request.pk]),
        shown(request, verdict="approve", allow_similar=scope),
        **HX,
    )
    assert response.status_code == 200, response.content.decode()
    assert "allowed for this run" in response.content.decode() or scope == "hour"
    request.refresh_from_db()
    assert request.status == "approved" and request.decided_by == "fin"
    grant = Grant.objects.get()
    assert grant.source == "reviewer" and grant.created_by == fin
    assert grant.tool_pattern == "payments.refund" and grant.agent.name == "bot"
    assert 'args.order_id == "A-1004"' in grant.condition and grant.max_uses
    if scope == "run":
        assert grant.run_id == request.run_id and grant.expires_at is None
    else:
        assert grant.run_id is None
        assert timedelta(minutes=59) < grant.expires_at - timezone.now() <= timedelta(hours=1)


def test_allow_similar_refused_is_a_422_fragment_and_decides_nothing(fin):
    from approvals.policy.models import Grant

    request = make_request()  # the rule did not permit it
    response = client_for(fin).post(
        reverse("approvals:decide", args=[request.pk]),
        shown(request, verdict="approve", allow_similar="run"),
        **HX,
    )
    html = response.content.decode()
    assert response.status_code == 422 and "<html" not in html
    assert "does not permit allowing similar" in html
    request.refresh_from_db()
    assert request.status == "pending" and not Grant.objects.exists()
    assert not Decision.objects.filter(request=request).exists()

    quorum = make_request(obligations={"allow_similar": True}, quorum=2, seq=2)
    response = client_for(fin).post(
        reverse("approvals:decide", args=[quorum.pk]),
        shown(quorum, verdict="approve", allow_similar="hour"),
        **HX,
    )
    assert response.status_code == 422 and "quorum 2" in response.content.decode()
    assert not Grant.objects.exists()


def _reviewer_grant(run, *, by, hour=False, **extra):
    from approvals.policy.models import Grant

    fields = dict(
        agent=run.agent,
        tool_pattern="payments.refund",
        condition='args.order_id == "A-1004"',
        run_id=None if hour else run.pk,
        expires_at=timezone.now() + timedelta(hours=1) if hour else None,
        max_uses=10,
        uses=2,
        source="reviewer",
        created_by=by,
        request=make_request(run, status="approved"),  # a finance request: its team's grant
    )
    fields.update(extra)
    return Grant.objects.create(**fields)


def test_the_run_page_loads_its_reviewer_grants_which_list_run_and_hour_grants(fin):
    from orchestration.ledger.chain import ledger_append

    run, other = make_run(), make_run()
    mine = _reviewer_grant(run, by=fin)
    hour = _reviewer_grant(run, by=fin, hour=True, tool_pattern="email.send")
    ledger_append(
        "approval.decided", actor=fin, run_id=run.pk,
        payload={"verdict": "approve", "allow_similar": {"scope": "hour", "grant": hour.pk}},
    )  # fmt: skip
    elsewhere = _reviewer_grant(other, by=fin)
    admin = _reviewer_grant(run, by=fin, source="admin")
    revoked = _reviewer_grant(run, by=fin, revoked_at=timezone.now())
    client = client_for(fin)

    page = client.get(reverse("runs:detail", args=[run.pk])).content.decode()
    url = reverse("approvals:run_grants", args=[run.pk])
    assert f'hx-get="{url}"' in page and 'hx-trigger="load"' in page and f'href="{url}"' in page

    response = client.get(url, **HX)
    html = response.content.decode()
    assert response.status_code == 200 and html.lstrip().startswith('<section id="run-grants"')
    assert f'id="run-grant-{mine.pk}"' in html and f'id="run-grant-{hour.pk}"' in html
    for absent in (elsewhere, admin, revoked):
        assert f'id="run-grant-{absent.pk}"' not in html
    assert "2 / 10" in html and "this run" in html and "all runs of bot" in html
    assert "args.order_id == &quot;A-1004&quot;" in html and "fin" in html
    assert "<html" in client.get(url).content.decode()  # a page of its own without htmx


def test_revoke_a_reviewer_grant_from_the_run_page(fin):
    run = make_run()
    grant = _reviewer_grant(run, by=fin)
    url = reverse("approvals:grant_revoke", args=[grant.pk])
    client = client_for(member("rev2", "finance"))  # the request's team, not only its maker

    response = client.post(url, {"run_id": run.pk}, **HX)
    html = response.content.decode()
    assert response.status_code == 200 and f"Grant #{grant.pk} revoked." in html
    assert f'id="run-grant-{grant.pk}"' not in html
    grant.refresh_from_db()
    assert grant.revoked_at and grant.revoked_by == "rev2"

    again = client.post(url, {"run_id": run.pk}, **HX)
    assert again.status_code == 409 and "already revoked" in again.content.decode()

    plain = _reviewer_grant(run, by=fin)
    detail = reverse("runs:detail", args=[run.pk])
    response = client.post(reverse("approvals:grant_revoke", args=[plain.pk]), {"next": detail})
    assert response.status_code == 302 and response.url == detail
    evil = _reviewer_grant(run, by=fin)
    response = client.post(
        reverse("approvals:grant_revoke", args=[evil.pk]), {"next": "https://evil.example/"}
    )
    assert response.status_code == 302 and response.url == detail


def test_run_grants_permissions(fin):
    from approvals.roles import POLICY_ADMIN

    run = make_run()
    grant = _reviewer_grant(run, by=fin)
    admin_grant = _reviewer_grant(run, by=fin, source="admin")
    list_url = reverse("approvals:run_grants", args=[run.pk])
    revoke_url = reverse("approvals:grant_revoke", args=[grant.pk])

    assert Client().get(list_url).status_code == 302  # to the login page
    assert Client().post(revoke_url).status_code == 302
    auditor = client_for(member("aud", role=AUDITOR))
    assert auditor.get(list_url).status_code == 403
    assert auditor.post(revoke_url).status_code == 403
    page = auditor.get(reverse("runs:detail", args=[run.pk])).content.decode()
    assert list_url not in page
    # admins' grants are revoked on the policy pages, not here
    other = reverse("approvals:grant_revoke", args=[admin_grant.pk])
    assert client_for(fin).post(other).status_code == 404
    assert client_for(fin).get(revoke_url).status_code == 405

    policy = client_for(member("pol", role=POLICY_ADMIN))
    assert policy.get(list_url).status_code == 200
    assert policy.post(revoke_url, {"run_id": run.pk}, **HX).status_code == 200
    grant.refresh_from_db()
    assert grant.revoked_by == "pol"


# --- several reviewers: what each was shown, and the count --------------------------------


def test_a_decision_on_arguments_edited_since_the_page_was_shown_is_a_409_that_writes_nothing(fin):
    request = make_request(quorum=2)
    dana = member("dana", "finance")
    page = client_for(fin).get(reverse("approvals:request", args=[request.pk])).content.decode()
    assert f'name="action_hash" value="{request.action_hash}"' in page  # in every decision form
    url = reverse("approvals:decide", args=[request.pk])
    edit = {"verdict": "edit", "confirm": "1", "arg-order_id": "A-1004", "arg-amount": "80"}
    assert client_for(dana).post(url, shown(request, **edit), **HX).status_code == 200
    records = AuditRecord.objects.filter(verb__startswith="approval.").count()

    for verdict in ("approve", "reject"):  # fin decides on the page shown before dana's edit
        before = {"action_hash": action_hash("payments.refund", request.args)}
        stale = client_for(fin).post(url, {**before, "verdict": verdict, "comment": "No."}, **HX)
        html = stale.content.decode()
        assert stale.status_code == 409 and html.lstrip().startswith('<div id="request-panel"')
        assert "changed since you were shown them (dana edited them)" in html
        # the refreshed panel shows the edit to decide on, and posts its hash
        request.refresh_from_db()
        assert f'name="action_hash" value="{request.action_hash}"' in html
        assert "Edited by dana" in html and "1 of 2</strong> approvals" in html
    assert Decision.objects.filter(request=request).count() == 1
    assert AuditRecord.objects.filter(verb__startswith="approval.").count() == records

    done = client_for(fin).post(url, shown(request, verdict="approve"), **HX)
    assert done.status_code == 200
    request.refresh_from_db()
    assert request.status == "edited" and request.approved_args["amount"] == 80
    decision = Decision.objects.get(request=request, reviewer=fin)
    assert decision.snapshot["args"] == {"order_id": "A-1004", "amount": 80}


def test_a_request_needing_two_approvals_shows_the_count_who_approved_and_the_pending_edit(fin):
    request = make_request(quorum=2, minutes=5)
    dana, erin = member("dana", "finance"), member("erin", "finance")
    url = reverse("approvals:decide", args=[request.pk])
    client_for(dana).post(url, shown(request, verdict="approve"), **HX)
    queue = client_for(fin).get(reverse("approvals:queue")).content.decode()
    assert "0 of 2</strong> approvals" not in queue and "1 of 2</strong> approvals" in queue
    assert "approved by dana" in queue

    edit = {"verdict": "edit", "confirm": "1", "arg-order_id": "A-1004", "arg-amount": "80"}
    response = client_for(erin).post(url, shown(request, **edit), **HX)
    assert "Your edit is recorded: 1 of 2 approvals" in response.content.decode()
    request.refresh_from_db()
    page = client_for(fin).get(reverse("approvals:request", args=[request.pk])).content.decode()
    for text in (
        "1 of 2</strong> approvals",  # erin's edit restarted the count: dana approved 1899
        "approved by erin",
        "Edited by erin",
        "payments.refund: order_id A-1004, amount 80",  # the arguments under review
        '<td class="diff-remove">1899</td><td class="diff-add">80</td>',
        f'name="action_hash" value="{request.action_hash}"',
    ):
        assert text in page, text
    row = client_for(fin).get(reverse("approvals:queue")).content.decode()
    assert "edited by erin" in row and "amount 1899</span> → <span" in row
    # a row shows a summary: it carries nothing to decide with (decisions are taken on the page)
    assert (
        request.action_hash not in row and reverse("approvals:decide", args=[request.pk]) not in row
    )
    assert "<kbd>a</kbd></dt><dd>Approve (opens the request" in row

    mine = client_for(erin).get(reverse("approvals:request", args=[request.pk])).content.decode()
    assert "You decided this request" in mine and ">Approve</button>" not in mine
