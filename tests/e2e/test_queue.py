"""The live approval queue in Chromium: two reviewers of the same team see a request arrive,
one claims it (the other sees the claim), edits the amount and approves; the run then refunds the
edited amount and the request leaves the other reviewer's queue."""

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from channels_redis.core import RedisChannelLayer
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from playwright.sync_api import expect

from approvals.policy.seed import policy_seed
from approvals.queue.models import ApprovalRequest, ReviewerTeam
from approvals.queue.transitions import QUEUE_GROUP
from approvals.roles import REVIEWER
from orchestration.demo.models import Refund
from orchestration.demo.seed import demo_data_seed
from orchestration.engine.runner import run_advance
from orchestration.engine.timeouts import close_helper_connections
from orchestration.runs.models import Run
from orchestration.runs.realtime import RUNS_GROUP, run_group
from orchestration.runs.services import run_start
from tests.e2e.test_smoke import login

pytestmark = [pytest.mark.browser, pytest.mark.redis]
GATE = "approvals.policy.gate.PolicyGate"


@pytest.fixture(autouse=True)
def _close_step_thread_connections():
    yield
    close_helper_connections()


async def _send(redis_url: str, run_id: int) -> None:
    layer = RedisChannelLayer(hosts=[redis_url])
    await layer.group_send(QUEUE_GROUP, {"type": "queue.changed", "request_id": 0})
    for group in (run_group(run_id), RUNS_GROUP):
        await layer.group_send(group, {"type": "run.changed", "run_id": run_id})


def changed(redis_url: str, run_id: int) -> None:
    with ThreadPoolExecutor(1) as pool:  # Playwright's loop owns this thread
        pool.submit(asyncio.run, _send(redis_url, run_id)).result()


def advance(run: Run, until) -> None:
    for _ in range(20):
        if until():
            return
        run_advance(run.pk)
    state = Run.objects.get(pk=run.pk)
    assert until(), (
        state.status,
        state.error,
        list(state.step_set.values_list("name", "status", "error")),
    )


def reviewer(name: str):
    account = get_user_model().objects.create_user(name, password=f"pw-{name}-12345")
    account.groups.add(Group.objects.get(name=REVIEWER))
    ReviewerTeam.objects.get_or_create(name="finance")[0].members.add(account)
    return account


@pytest.fixture
def refund_run(request, monkeypatch, settings, redis_url, transactional_db):
    monkeypatch.setenv("BATON_GATE", GATE)  # before Daphne starts: live_env passes it on
    settings.BATON_GATE = GATE  # the run advances in this process
    base_url = request.getfixturevalue("live_server_url")
    owner = get_user_model().objects.create_user("owner")
    demo_data_seed(owner=owner)
    policy_seed()
    run = run_start(
        workflow="customer_refund",
        input={"order_id": "A-1004", "reason": "The laptop arrived with a cracked screen."},
        agent="refund-bot",
        intent={"goal": "Refund order A-1004"},
        started_by=owner,
    )
    return base_url, run


def test_two_reviewers_share_the_live_queue(browser, refund_run, redis_url):
    base_url, run = refund_run
    reviewer("ana"), reviewer("ben")
    pages = {}
    for name in ("ana", "ben"):
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        pages[name] = page = context.new_page()
        page.set_default_timeout(5000)
        login(page, base_url, name, f"pw-{name}-12345")
        page.wait_for_url(base_url + "/approvals/")
        expect(page.locator("#queue-body")).to_contain_text("Nothing is waiting")
    ana, ben = pages["ana"], pages["ben"]

    advance(run, lambda: ApprovalRequest.objects.filter(run_id=run.pk).exists())
    request = ApprovalRequest.objects.get(run_id=run.pk)
    assert request.team == "finance" and request.args["amount"] == 1899
    changed(redis_url, run.pk)
    for page in (ana, ben):
        row = page.locator(f"#req-{request.pk}")
        expect(row).to_contain_text("payments.refund: order_id A-1004, amount 1899")
        expect(row).to_contain_text("unclaimed")

    ana.locator(f"#req-{request.pk} a").click()
    ana.wait_for_url(f"{base_url}/approvals/{request.pk}/")
    expect(ana.locator("#run-timeline")).to_contain_text("orders.lookup")
    ana.get_by_role("button", name="Claim", exact=True).click()
    expect(ana.locator("#request-state")).to_contain_text("claimed by you")
    expect(ben.locator(f"#req-{request.pk}")).to_contain_text("claimed by ana")
    if os.environ.get("BATON_SCREENSHOTS"):
        path = Path(os.environ["BATON_SCREENSHOTS"])
        ben.screenshot(path=str(path / "queue.png"), full_page=True)
        ana.screenshot(path=str(path / "request.png"), full_page=True)

    ana.get_by_role("button", name="Edit & approve").click()
    amount = ana.get_by_label("Amount")
    expect(amount).to_have_value("1899")
    amount.fill("80")
    ana.get_by_role("button", name="Review changes").click()
    expect(ana.locator(".diff-table")).to_contain_text("80")
    ana.get_by_role("button", name="Confirm edit & approve").click()
    expect(ana.locator("#request-state")).to_contain_text("Already decided by ana")

    expect(ben.locator(f"#req-{request.pk}")).to_have_count(0)
    advance(run, lambda: Refund.objects.filter(order__order_id="A-1004").exists())
    refund = Refund.objects.get(order__order_id="A-1004")
    assert refund.amount == 80  # the edited amount, not the 1899 the agent proposed


# --- halting from a request; the keyboard; the focused row keeps its place ------------------


def test_halt_run_from_a_request_stops_the_run_and_closes_its_other_requests(
    browser, refund_run, redis_url
):
    base_url, run = refund_run
    reviewer("ana")
    advance(run, lambda: ApprovalRequest.objects.filter(run_id=run.pk).exists())
    first = ApprovalRequest.objects.get(run_id=run.pk)
    second = ApprovalRequest.objects.create(
        run_id=run.pk, step_seq=first.step_seq + 1, agent=first.agent, tool=first.tool,
        args=first.args, action_hash=first.action_hash, team=first.team,
        deadline=first.deadline, risk_score=first.risk_score, verdict=first.verdict,
    )  # fmt: skip
    page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
    page.set_default_timeout(5000)
    login(page, base_url, "ana", "pw-ana-12345")
    page.wait_for_url(base_url + "/approvals/")
    expect(page.locator(f"#req-{second.pk}")).to_have_count(1)

    page.goto(f"{base_url}/approvals/{first.pk}/")
    expect(page.locator(f'#related a[href="/approvals/{second.pk}/"]')).to_have_count(1)
    page.locator("#request-decide .open-forms").get_by_role("button", name="Halt run").click()
    page.get_by_label("Why halt the whole run?").fill("The agent is refunding twice.")
    page.locator("#halt-form").get_by_role("button", name="Halt run").click()
    expect(page.locator("#request-state")).to_contain_text("Already decided by ana")
    expect(page.locator("#run-header")).to_have_attribute("data-status", "halted")
    assert Run.objects.get(pk=run.pk).status == "halted"
    second.refresh_from_db()
    assert second.status not in ("pending", "claimed")

    page.goto(base_url + "/approvals/")
    expect(page.locator("#queue-body")).to_contain_text("Nothing is waiting")
    expect(page.locator(f"#req-{second.pk}")).to_have_count(0)


@pytest.fixture
def queue_page(browser, live_server_url):
    """A reviewer on the queue page, and a function to add a request to it."""
    from tests.approvals.queue.test_views import make_request, make_run

    reviewer("ana")
    run = make_run()
    seq = iter(range(1, 1000))

    def add(minutes: int) -> ApprovalRequest:
        return make_request(run, seq=next(seq), minutes=minutes)

    def open_queue(height: int = 800):
        page = browser.new_context(viewport={"width": 1280, "height": height}).new_page()
        page.set_default_timeout(5000)
        login(page, live_server_url, "ana", "pw-ana-12345")
        page.wait_for_url(live_server_url + "/approvals/")
        return page

    return live_server_url, run, add, open_queue


def test_queue_keyboard_j_j_enter_opens_the_second_request_and_question_mark_helps(queue_page):
    base_url, _run, add, open_queue = queue_page
    requests = [add(minutes) for minutes in (10, 20, 30)]
    page = open_queue()
    expect(page.locator("#queue-body tr.queue-row")).to_have_count(3)

    page.keyboard.press("j")
    expect(page.locator(f"#req-{requests[0].pk}")).to_be_focused()
    page.keyboard.press("j")
    expect(page.locator(f"#req-{requests[1].pk}")).to_be_focused()
    page.keyboard.press("Enter")
    page.wait_for_url(f"{base_url}/approvals/{requests[1].pk}/")

    page.goto(base_url + "/approvals/")
    help_dialog = page.locator("#queue-help")
    expect(help_dialog).to_be_hidden()
    page.keyboard.press("?")
    expect(help_dialog).to_be_visible()
    assert page.evaluate("() => document.getElementById('queue-help').open") is True
    expect(help_dialog).to_contain_text("Approve (opens the request")


def test_queue_keyboard_approve_opens_the_request_and_decides_nothing(queue_page):
    """A row shows only a summary of the arguments: ``a`` opens the request page, where the
    reviewer reads them in full and decides."""
    base_url, _run, add, open_queue = queue_page
    requests = [add(minutes) for minutes in (10, 20)]
    page = open_queue()
    page.keyboard.press("j")
    page.keyboard.press("j")
    expect(page.locator(f"#req-{requests[1].pk}")).to_be_focused()

    page.keyboard.press("a")

    page.wait_for_url(f"{base_url}/approvals/{requests[1].pk}/")
    expect(page.locator("#request-state")).to_have_attribute("data-status", "pending")
    for request in requests:
        request.refresh_from_db()
        assert request.status == "pending" and not request.decisions.exists()


def test_the_focused_row_keeps_its_place_when_a_row_arrives_above_it(queue_page, redis_url):
    _base_url, run, add, open_queue = queue_page
    requests = [add(10 + minutes) for minutes in range(14)]
    page = open_queue(height=500)  # short: the page scrolls, so there is room to keep the place
    expect(page.locator("#queue-body tr.queue-row")).to_have_count(14)
    target = requests[6]
    for _ in range(7):
        page.keyboard.press("j")
    expect(page.locator(f"#req-{target.pk}")).to_be_focused()
    top = "() => document.activeElement.getBoundingClientRect().top"
    before = page.evaluate(top)
    scrolled = page.evaluate("() => window.scrollY")

    earlier = add(1)  # sorts first: a new row above the focused one
    changed(redis_url, run.pk)
    expect(page.locator("#queue-body tr.queue-row").first).to_have_id(f"req-{earlier.pk}")
    expect(page.locator(f"#req-{target.pk}")).to_be_focused()
    after = page.evaluate(top)
    assert abs(after - before) <= 2, (before, after, scrolled)
    assert page.evaluate("() => window.scrollY") > scrolled  # it kept its place by scrolling
