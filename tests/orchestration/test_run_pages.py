"""The run pages: list and filters, access per role, the detail timeline, halt and retry, the
start form built from a workflow's schema, and the live fragments over the websocket."""

import re

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.test import Client

from approvals.roles import AUDITOR, POLICY_ADMIN, REVIEWER
from config.asgi import application
from orchestration.demo.models import Order
from orchestration.engine.runner import run_advance
from orchestration.engine.timeouts import close_helper_connections
from orchestration.registry.declare import workflow
from orchestration.registry.models import Agent
from orchestration.retrieval.services import document_add
from orchestration.runs import selectors
from orchestration.runs.access import OpenRunAccess, run_access
from orchestration.runs.models import Event, Run, RunStatus, Step
from orchestration.runs.realtime import run_group
from orchestration.runs.services import run_start
from orchestration.runs.views import LiveDetail, LiveList, csrf_token_for, oob

SCRIPT = "<script>alert('owned')</script>"

PAGES_SCHEMA = {
    "type": "object",
    "title": "Test pages",
    "properties": {
        "label": {"type": "string", "title": "Label", "minLength": 2, "default": "hello"},
        "code": {"type": "string", "title": "Code", "pattern": "^[A-Z]{2}$", "default": "AB"},
        "count": {"type": "integer", "title": "Count", "minimum": 1, "default": 2},
        "ratio": {"type": "number", "title": "Ratio", "exclusiveMaximum": 1, "default": 0.5},
        "loud": {"type": "boolean", "title": "Loud", "default": False},
        "size": {"type": "integer", "title": "Size", "enum": [1, 2, 3], "default": 2},
    },
    "required": ["label", "code"],
}


@workflow("test.pages", input_schema=PAGES_SCHEMA, tools=["orders.lookup"])
def pages_workflow(ctx, label: str, code: str, count=2, ratio=0.5, loud=False, size=2):
    """Look up an order, then check the label."""
    ctx.progress(0.5, "Looking up")
    order = ctx.tool(
        "orders.lookup",
        order_id="A-1001",
        _reasoning=f"Find the order for {label}",
        _confidence=0.9,
    )
    ctx.check("label is short", len(label) < 100, detail=f"{len(label)} characters")
    return {"item": order["item"], "label": label}


@pytest.fixture(autouse=True)
def _close_step_thread_connections():
    yield
    close_helper_connections()  # tools run on the engine's helper thread


def user_with(role: str | None, name: str = ""):
    user = get_user_model().objects.create_user(name or f"user-{role or 'none'}".replace(" ", "-"))
    if role:
        user.groups.add(Group.objects.get(name=role))
    return user


def client_for(role: str | None) -> Client:
    client = Client()
    client.force_login(user_with(role))
    return client


def htmx(client: Client, method: str, url: str, data=None):
    return getattr(client, method)(url, data or {}, HTTP_HX_REQUEST="true")


def make_run(status: str = RunStatus.PENDING, **fields) -> Run:
    defaults = {"workflow": "test.pages", "workflow_version": 1, "input": {"label": "x"}}
    return Run.objects.create(status=status, **{**defaults, **fields})


def order() -> None:
    Order.objects.get_or_create(
        order_id="A-1001",
        defaults={
            "customer_email": "c@example.com",
            "customer_name": "Cam",
            "item": "Blender",
            "amount": "120.00",
        },
    )


def drive(run_id: int) -> Run:
    for _ in range(20):
        run_advance(run_id)
        run = Run.objects.get(pk=run_id)
        if run.is_final:
            return run
    raise AssertionError(f"run {run_id} did not finish")


def test_the_control_plane_fills_the_run_access_extension_point(settings):
    """Orchestration names no role: approvals answers through ``BATON_RUN_ACCESS``; without it,
    every signed-in user may look and act."""
    assert settings.BATON_RUN_ACCESS == "approvals.access.RunAccess"
    del settings.BATON_RUN_ACCESS
    assert isinstance(run_access(), OpenRunAccess)


@pytest.mark.django_db
def test_without_the_control_plane_every_signed_in_user_may_look_and_halt(settings):
    settings.BATON_RUN_ACCESS = "orchestration.runs.access.OpenRunAccess"
    run = make_run(status=RunStatus.RUNNING)
    client = client_for(None)
    page = client.get(f"/runs/{run.pk}/").content.decode()
    assert "Halt run" in page and "Allowed similar" not in page
    assert client.post(f"/runs/{run.pk}/halt/", {"reason": "stop"}).status_code == 302
    run.refresh_from_db()
    assert run.status == RunStatus.HALTED


# --- access -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_anonymous_users_are_sent_to_login():
    run = make_run()
    for url in ["/runs/", f"/runs/{run.pk}/", f"/runs/{run.pk}/timeline/", "/runs/new/"]:
        response = Client().get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith("/login/"), url
    assert Client().post(f"/runs/{run.pk}/halt/", {"reason": "x"})["Location"].startswith("/login/")


@pytest.mark.django_db
@pytest.mark.parametrize("role", [REVIEWER, POLICY_ADMIN, AUDITOR])
def test_every_role_sees_runs_and_the_nav_item(role):
    run = make_run()
    client = client_for(role)
    html = client.get("/runs/").content.decode()
    assert 'href="/runs/" aria-current="page">Runs</a>' in html
    assert client.get(f"/runs/{run.pk}/").status_code == 200
    assert client.get(f"/runs/{run.pk}/timeline/").status_code == 200
    assert 'aria-current="page">Runs</a>' in client.get(f"/runs/{run.pk}/").content.decode()


@pytest.mark.django_db
def test_a_user_without_a_role_gets_403_everywhere():
    run = make_run(status=RunStatus.FAILED)
    client = client_for(None)
    for url in ["/runs/", f"/runs/{run.pk}/", f"/runs/{run.pk}/timeline/", "/runs/new/"]:
        assert client.get(url).status_code == 403, url
    assert client.post(f"/runs/{run.pk}/halt/", {"reason": "x"}).status_code == 403
    assert client.post(f"/runs/{run.pk}/retry/").status_code == 403


@pytest.mark.django_db
def test_reviewers_land_on_the_queue_and_only_admins_may_start_runs():
    reviewer, auditor, admin = client_for(REVIEWER), client_for(AUDITOR), client_for(POLICY_ADMIN)
    assert reviewer.get("/")["Location"] == "/approvals/"
    assert auditor.get("/")["Location"] == "/audit/"
    assert reviewer.get("/runs/new/").status_code == 403
    assert auditor.get("/runs/new/test.pages/").status_code == 403
    assert "Start a run" not in reviewer.get("/runs/").content.decode()
    assert admin.get("/runs/new/").status_code == 200
    assert "Start a run" in admin.get("/runs/").content.decode()


# --- the list -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_list_filters_by_status_agent_and_workflow():
    agent = Agent.objects.create(name="clerk")
    failed = make_run(status=RunStatus.FAILED, agent=agent)
    done = make_run(status=RunStatus.COMPLETED, workflow="customer_refund")
    other = make_run(status=RunStatus.FAILED, workflow="customer_refund")
    client = client_for(AUDITOR)

    def rows(query: str) -> set[int]:
        html = client.get("/runs/" + query).content.decode()
        return {run.pk for run in (failed, done, other) if f'id="run-{run.pk}"' in html}

    assert rows("") == {failed.pk, done.pk, other.pk}
    assert rows("?status=failed") == {failed.pk, other.pk}
    assert rows("?agent=clerk") == {failed.pk}
    assert rows("?workflow=customer_refund") == {done.pk, other.pk}
    assert rows("?workflow=customer_refund&status=failed") == {other.pk}
    assert rows("?status=bogus") == {failed.pk, done.pk, other.pk}  # ignored, not an error
    html = client.get("/runs/?status=failed").content.decode()
    assert 'ws-connect="/ws/runs/?status=failed"' in html
    assert '<option value="failed" selected>' in html


@pytest.mark.django_db
def test_an_htmx_request_gets_the_table_partial_not_the_page():
    make_run()
    client = client_for(REVIEWER)
    full = client.get("/runs/").content.decode()
    partial = htmx(client, "get", "/runs/?status=pending")
    assert "<html" in full and 'id="runs-table"' in full
    body = partial.content.decode()
    assert body.lstrip().startswith('<div id="runs-table"')
    assert "<html" not in body and "<nav" not in body
    assert "HX-Request" in partial["Vary"]


# --- the detail page ----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_timeline_tells_the_story_and_escapes_agent_text():
    order()
    run = run_start(workflow="test.pages", input={"label": f"hi {SCRIPT}", "code": "AB"})
    assert drive(run.pk).status == RunStatus.COMPLETED
    client = client_for(REVIEWER)

    html = client.get(f"/runs/{run.pk}/").content.decode()

    assert "Find the order for hi &lt;script&gt;" in html  # the reasoning, escaped
    assert SCRIPT not in html
    assert "(confidence 90%)" in html
    assert '<th scope="row">order_id</th><td>A-1001</td>' in html  # tool arguments
    assert "&quot;item&quot;: &quot;Blender&quot;" in html  # the result as pretty JSON
    assert "✓ passed" in html and "label is short" in html  # the check
    assert "Gate: allow" in html  # the verdict
    assert 'id="step-1"' in html and 'id="step-2"' in html
    assert html.index('id="step-1"') < html.index('id="step-2"') < html.index("Run completed.")
    assert '<progress max="100" value="100"' in html
    assert "Halt run" not in html  # final
    assert "Retry" not in html
    timeline = client.get(f"/runs/{run.pk}/timeline/").content.decode()
    assert timeline.lstrip().startswith('<section id="run-timeline"')
    assert "<html" not in timeline


@pytest.mark.django_db(transaction=True)
def test_a_customer_refund_run_shows_model_retrieval_and_snippets():
    order()
    document_add(source="policies", title="Refund policy", body="Refunds within 30 days.")
    run = run_start(workflow="customer_refund", input={"order_id": "A-1001", "reason": "broken"})
    assert drive(run.pk).status == RunStatus.COMPLETED
    html = client_for(AUDITOR).get(f"/runs/{run.pk}/").content.decode()
    assert "model call" in html and "Prompt · 2 messages" in html
    assert "You decide customer refunds strictly by the policy." in html
    assert "untrusted input" in html and "Refunds within 30 days." in html
    assert "refund within what was paid" in html


@pytest.mark.django_db
def test_the_detail_partial_for_htmx_and_the_header_facts():
    parent = make_run(status=RunStatus.RUNNING)
    run = make_run(
        status=RunStatus.RUNNING,
        parent=parent,
        intent={"goal": "Refund the blender", "constraints": ["amount <= 100"]},
        progress=0.4,
        progress_label="Deciding",
        tokens=1234,
        cost_usd="0.012",
    )
    client = client_for(REVIEWER)
    html = client.get(f"/runs/{run.pk}/").content.decode()
    for text in ["Refund the blender", "amount &lt;= 100", "40%", "Deciding", "1234", "$0.01"]:
        assert text in html, text
    assert f'href="/runs/{parent.pk}/"' in html
    assert f'ws-connect="/ws/runs/{run.pk}/"' in html
    partial = htmx(client, "get", f"/runs/{run.pk}/").content.decode()
    assert partial.lstrip().startswith('<div id="run-live"') and "<html" not in partial


# --- halt and retry -----------------------------------------------------------------------


@pytest.mark.django_db
def test_halting_needs_a_reason():
    run = make_run(status=RunStatus.RUNNING)
    client = client_for(REVIEWER)
    response = client.post(f"/runs/{run.pk}/halt/", {"reason": "  "})
    assert response.status_code == 422
    assert "Say why you are halting" in response.content.decode()
    assert "<html" in response.content.decode()  # the page, with the form and its error
    partial = htmx(client, "post", f"/runs/{run.pk}/halt/", {"reason": ""})
    assert partial.status_code == 422
    assert 'aria-invalid="true"' in partial.content.decode()
    assert "<html" not in partial.content.decode()
    run.refresh_from_db()
    assert run.status == RunStatus.RUNNING


@pytest.mark.django_db
def test_halting_with_a_reason_halts_the_run():
    run = make_run(status=RunStatus.RUNNING)
    client = client_for(REVIEWER)
    response = client.post(f"/runs/{run.pk}/halt/", {"reason": "Wrong customer"})
    assert response.status_code == 302
    assert response["Location"] == f"/runs/{run.pk}/"
    run.refresh_from_db()
    assert run.status == RunStatus.HALTED
    assert run.halt_reason == "Wrong customer"
    assert run.halted_by == "user-Reviewer"
    page = client.get(response["Location"]).content.decode()
    assert "Halted by user-Reviewer:</strong> Wrong customer" in page
    assert f"Run {run.pk} halted." in page  # the message


@pytest.mark.django_db
def test_halting_over_htmx_returns_the_live_partial():
    run = make_run(status=RunStatus.WAITING)
    response = htmx(client_for(POLICY_ADMIN), "post", f"/runs/{run.pk}/halt/", {"reason": "Stop"})
    assert response.status_code == 200
    html = response.content.decode()
    assert html.lstrip().startswith('<div id="run-summary"')
    assert 'id="run-timeline"' not in html  # the socket appends to it: no second copy
    assert "Halt run" not in html and f"Run {run.pk} halted." in html


@pytest.mark.django_db
def test_halting_a_completed_run_is_a_conflict():
    run = make_run(status=RunStatus.COMPLETED)
    client = client_for(REVIEWER)
    response = client.post(f"/runs/{run.pk}/halt/", {"reason": "too late"})
    assert response.status_code == 409
    assert f"Run {run.pk} is already completed." in response.content.decode()
    partial = htmx(client, "post", f"/runs/{run.pk}/halt/", {"reason": "too late"})
    assert partial.status_code == 409
    assert 'role="alert"' in partial.content.decode()


@pytest.mark.django_db
def test_action_forms_work_as_plain_posts_with_their_csrf_token():
    """From the page and from the socket's rendering alike, so they work without htmx."""
    first, second = make_run(status=RunStatus.RUNNING), make_run(status=RunStatus.RUNNING)
    reviewer = user_with(REVIEWER)
    client = Client(enforce_csrf_checks=True)
    client.force_login(reviewer)
    token = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')
    page_token = token.search(client.get(f"/runs/{first.pk}/").content.decode()).group(1)
    cookie_token = csrf_token_for({"csrftoken": client.cookies["csrftoken"].value})
    [live] = LiveDetail(second.pk, cookie_token).update(reviewer.pk, set())
    live_token = token.search(live).group(1)

    assert client.post(f"/runs/{first.pk}/halt/", {"reason": "x"}).status_code == 403
    for run, csrf in [(first, page_token), (second, live_token)]:
        response = client.post(
            f"/runs/{run.pk}/halt/", {"reason": "x", "csrfmiddlewaretoken": csrf}
        )
        assert response.status_code == 302
    assert csrf_token_for({}) == ""


@pytest.mark.django_db
def test_auditors_may_not_halt():
    run = make_run(status=RunStatus.RUNNING)
    client = client_for(AUDITOR)
    assert "Halt run" not in client.get(f"/runs/{run.pk}/").content.decode()
    assert client.post(f"/runs/{run.pk}/halt/", {"reason": "x"}).status_code == 403


@pytest.mark.django_db
def test_a_policy_admin_retries_a_failed_run_and_a_reviewer_may_not():
    run = make_run(status=RunStatus.FAILED, error="ConnectionError: reset")
    step = Step.objects.create(
        run=run, seq=1, kind="tool", name="orders.lookup", status="failed", error="reset"
    )
    reviewer, admin = client_for(REVIEWER), client_for(POLICY_ADMIN)
    assert "Retry" not in reviewer.get(f"/runs/{run.pk}/").content.decode()
    assert reviewer.post(f"/runs/{run.pk}/retry/").status_code == 403
    assert ">Retry</button>" in admin.get(f"/runs/{run.pk}/").content.decode()

    response = admin.post(f"/runs/{run.pk}/retry/")

    assert response.status_code == 302
    run.refresh_from_db()
    step.refresh_from_db()
    assert run.status == RunStatus.PENDING
    assert step.status == "retrying"
    again = admin.post(f"/runs/{run.pk}/retry/")
    assert again.status_code == 409
    assert "Only failed runs can be retried" in again.content.decode()


# --- starting a run -----------------------------------------------------------------------


@pytest.mark.django_db
def test_the_workflow_picker_lists_the_demo_workflows():
    html = client_for(POLICY_ADMIN).get("/runs/new/").content.decode()
    for name in ["customer_refund", "travel_booking", "infra_change", "test.pages"]:
        assert f'href="/runs/new/{name}/"' in html
    assert client_for(None).get("/runs/new/nope/").status_code == 403


@pytest.mark.django_db
def test_the_start_form_is_built_from_the_schema_with_defaults():
    client = client_for(POLICY_ADMIN)
    assert client.get("/runs/new/nope/").status_code == 404
    html = client.get("/runs/new/test.pages/").content.decode()
    assert '<label for="id_label">Label <span class="muted">(required)</span></label>' in html
    assert 'name="label" value="hello"' in html
    assert 'name="code" value="AB"' in html
    assert 'type="number" name="count" value="2"' in html and 'min="1"' in html
    assert 'name="ratio" value="0.5"' in html
    assert 'type="checkbox" name="loud"' in html
    assert '<option value="2" selected>2</option>' in html
    refund = client.get("/runs/new/customer_refund/").content.decode()
    assert "Customer&#x27;s reason" in refund and "The blender arrived broken." in refund


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("code", "abc", "Must match the pattern ^[A-Z]{2}$, like AB."),
        ("label", "x", "at least 2 characters"),
        ("count", "0", "greater than or equal to 1"),
        ("ratio", "1.5", "1.5 is greater than or equal to the maximum of 1"),  # schema only
    ],
)
def test_a_bad_value_is_shown_on_its_field_and_starts_no_run(field, value, message):
    client = client_for(POLICY_ADMIN)
    data = {"label": "hello", "code": "AB", "count": "2", "ratio": "0.5", field: value}
    response = client.post("/runs/new/test.pages/", data)
    assert response.status_code == 422
    html = response.content.decode()
    assert f'<p class="field-error" id="id_{field}_error">' in html
    assert message in html
    assert not Run.objects.exists()
    partial = htmx(client, "post", "/runs/new/test.pages/", data)
    assert partial.status_code == 422
    assert partial.content.decode().lstrip().startswith('<form id="start-form"')


@pytest.mark.django_db
def test_a_valid_form_starts_a_run_and_opens_its_page():
    agent = Agent.objects.create(name="clerk")
    client = client_for(POLICY_ADMIN)
    data = {"label": " hello ", "code": "AB", "count": "3", "ratio": "0.25", "loud": "on"}
    data["size"] = "3"
    response = client.post(
        "/runs/new/test.pages/", {**data, "run-agent": "clerk", "run-goal": "Go"}
    )
    run = Run.objects.get()
    assert response.status_code == 302
    assert response["Location"] == f"/runs/{run.pk}/"
    assert run.input == {
        "label": "hello",
        "code": "AB",
        "count": 3,
        "ratio": 0.25,
        "loud": True,
        "size": 3,
    }
    assert run.agent == agent
    assert run.intent["goal"] == "Go"
    assert run.started_by.get_username() == "user-Policy-admin"
    redirect = htmx(client, "post", "/runs/new/test.pages/", data)
    assert redirect["HX-Redirect"] == f"/runs/{Run.objects.first().pk}/"


# --- live fragments -----------------------------------------------------------------------


def test_oob_marks_the_root_element():
    assert oob('\n<tr id="run-1" class="x"><td>1</td></tr>') == (
        '\n<tr hx-swap-oob="true" id="run-1" class="x"><td>1</td></tr>'
    )


@pytest.mark.django_db
def test_live_list_sends_changed_rows_and_new_matching_runs_on_top():
    viewer = user_with(AUDITOR)
    live = LiveList(selectors.RunFilters(status="failed"))
    [initial] = live.update(viewer.pk, set())
    assert initial.lstrip().startswith('<tbody hx-swap-oob="true" id="runs-body"')
    assert 'id="runs-empty"' in initial

    first = make_run(status=RunStatus.FAILED)
    [body] = live.update(viewer.pk, {first.pk})  # the list was empty: a new body
    assert body.lstrip().startswith('<tbody hx-swap-oob="true" id="runs-body"')
    assert f'id="run-{first.pk}"' in body and "runs-empty" not in body

    [row] = live.update(viewer.pk, {first.pk})  # not sent yet as a row: sent once
    assert row.startswith(f'\n<tr hx-swap-oob="true" id="run-{first.pk}"')
    assert live.update(viewer.pk, {first.pk}) == []  # nothing changed
    pending = make_run()
    newer = make_run(status=RunStatus.FAILED)
    Run.objects.filter(pk=first.pk).update(progress=0.5)
    updated, added = live.update(viewer.pk, {first.pk, pending.pk, newer.pk})
    # rows in place and new rows never share a message: a <tbody> after a top-level <tr>
    # would be dropped by the HTML parser
    assert "<tbody" not in updated and 'value="50"' in updated
    assert added.startswith('<tbody hx-swap-oob="afterbegin:#runs-body">')
    assert f'id="run-{newer.pk}"' in added and f'id="run-{pending.pk}"' not in added

    assert LiveList(selectors.RunFilters(before=first.pk)).update(viewer.pk, set())
    older = LiveList(selectors.RunFilters(before=first.pk))
    older.update(viewer.pk, set())
    assert older.update(viewer.pk, {newer.pk}) == []  # new runs go on the first page only
    viewer.groups.clear()
    assert live.update(viewer.pk, {first.pk}) is None  # the role was taken away


@pytest.mark.django_db
def test_live_detail_sends_only_what_changed():
    viewer = user_with(REVIEWER)
    run = make_run(status=RunStatus.RUNNING)
    Event.objects.create(run=run, kind="run.started", message="Run started.")
    live = LiveDetail(run.pk)
    [initial] = live.update(viewer.pk, set())
    for dom_id in ["run-header", "run-actions", "run-timeline"]:
        assert f'hx-swap-oob="true" id="{dom_id}"' in initial
    assert live.update(viewer.pk, {run.pk}) == []

    Run.objects.filter(pk=run.pk).update(progress=0.5)
    Event.objects.create(run=run, kind="run.waiting", message="Waiting: for a <b>reviewer</b>.")
    [html] = live.update(viewer.pk, {run.pk})
    assert 'id="run-header"' in html and 'value="50"' in html
    assert 'id="run-actions"' not in html  # unchanged: a half-typed halt reason survives
    assert 'id="run-timeline"' not in html  # only the new entry, appended
    assert html.count('<ol hx-swap-oob="beforeend:#timeline-items">') == 1
    assert "for a &lt;b&gt;reviewer&lt;/b&gt;." in html

    Step.objects.create(run=run, seq=1, kind="tool", name="orders.lookup", status="started")
    [html] = live.update(viewer.pk, {run.pk})
    assert 'id="step-1"' in html
    Step.objects.filter(run=run, seq=1).update(status="completed", output={"ok": True})
    [html] = live.update(viewer.pk, {run.pk})
    assert '<li hx-swap-oob="true" id="step-1"' in html  # replaced in place

    Run.objects.filter(pk=run.pk).update(status=RunStatus.COMPLETED)
    assert 'id="run-actions"' in live.update(viewer.pk, {run.pk})[0]


async def _session_cookie(role: str | None) -> str:
    @database_sync_to_async
    def login() -> str:
        client = Client()
        client.force_login(user_with(role, name=f"ws-{role or 'none'}".replace(" ", "-")))
        return f"sessionid={client.cookies['sessionid'].value}"

    return await login()


def _socket(path: str, cookie: str = "") -> WebsocketCommunicator:
    headers = [(b"host", b"127.0.0.1:8000"), (b"origin", b"http://127.0.0.1:8000")]
    if cookie:
        headers.append((b"cookie", cookie.encode()))
    return WebsocketCommunicator(application, path, headers=headers)


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_the_run_socket_sends_fragments_on_connect_and_on_each_change():
    run = await database_sync_to_async(make_run)(status=RunStatus.RUNNING)
    ws = _socket(f"/ws/runs/{run.pk}/", await _session_cookie(REVIEWER))
    connected, _ = await ws.connect()
    assert connected
    first = await ws.receive_from(timeout=3)
    assert 'id="run-header"' in first and 'id="run-timeline"' in first

    await database_sync_to_async(Run.objects.filter(pk=run.pk).update)(
        progress=0.7, progress_label="Refunding"
    )
    layer = get_channel_layer()
    for _ in range(5):  # a burst: coalesced into one render
        await layer.group_send(run_group(run.pk), {"type": "run.changed", "run_id": run.pk})
    second = await ws.receive_from(timeout=3)
    assert 'id="run-header"' in second and "Refunding" in second
    assert await ws.receive_nothing(timeout=0.5)
    await ws.disconnect()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_the_list_socket_sends_the_body_then_new_rows():
    older = await database_sync_to_async(make_run)()
    ws = _socket("/ws/runs/?status=pending", await _session_cookie(AUDITOR))
    assert (await ws.connect())[0]
    body = await ws.receive_from(timeout=3)
    assert 'id="runs-body"' in body and f'id="run-{older.pk}"' in body
    run = await database_sync_to_async(make_run)()
    await get_channel_layer().group_send("runs", {"type": "run.changed", "run_id": run.pk})
    html = await ws.receive_from(timeout=3)
    assert 'hx-swap-oob="afterbegin:#runs-body"' in html and f'id="run-{run.pk}"' in html
    await ws.disconnect()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_the_run_socket_refuses_anonymous_users_and_users_without_a_role():
    run = await database_sync_to_async(make_run)()
    anonymous = _socket(f"/ws/runs/{run.pk}/")
    assert await anonymous.connect() == (False, 4401)
    roleless = _socket("/ws/runs/", await _session_cookie(None))
    assert await roleless.connect() == (False, 4403)
    await anonymous.wait()  # the refused applications have ended
    await roleless.wait()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_the_run_socket_closes_for_a_missing_run():
    ws = _socket("/ws/runs/999999/", await _session_cookie(AUDITOR))
    assert (await ws.connect())[0]
    assert (await ws.receive_output(timeout=3))["type"] == "websocket.close"
    await ws.wait()
