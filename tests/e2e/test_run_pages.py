"""A run's page in Chromium: it updates live over the websocket as the run advances."""

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from channels_redis.core import RedisChannelLayer
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from playwright.sync_api import expect

from approvals.roles import POLICY_ADMIN
from orchestration.demo.models import Order
from orchestration.engine.runner import run_advance
from orchestration.engine.timeouts import close_helper_connections
from orchestration.retrieval.services import document_add
from orchestration.runs.models import Run
from orchestration.runs.realtime import RUNS_GROUP, run_group
from orchestration.runs.services import run_start
from tests.e2e.test_smoke import login

pytestmark = [pytest.mark.browser, pytest.mark.redis]


@pytest.fixture(autouse=True)
def _close_step_thread_connections():
    yield
    close_helper_connections()


async def send_changed(redis_url: str, run_id: int) -> None:
    layer = RedisChannelLayer(hosts=[redis_url])
    for group in (run_group(run_id), RUNS_GROUP):
        await layer.group_send(group, {"type": "run.changed", "run_id": run_id})


def test_a_runs_page_follows_the_run_live(page, live_server_url, redis_url):
    admin = get_user_model().objects.create_user("pat", password="pw-pat-12345")
    admin.groups.add(Group.objects.get(name=POLICY_ADMIN))
    Order.objects.create(
        order_id="A-1001",
        customer_email="c@example.com",
        customer_name="Cam",
        item="Blender",
        amount="120.00",
    )
    document_add(source="policies", title="Refund policy", body="Refunds within 30 days.")
    earlier = Run.objects.create(workflow="customer_refund", workflow_version=1, status="failed")

    login(page, live_server_url, "pat", "pw-pat-12345")
    page.wait_for_url(live_server_url + "/policy/rules/")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Runs").click()
    expect(page.locator(f"#run-{earlier.pk}")).to_contain_text("Failed")
    run = run_start(
        workflow="customer_refund",
        input={"order_id": "A-1001", "reason": "The blender arrived broken."},
        intent={"goal": "Refund a broken blender", "constraints": ["amount <= 150"]},
        started_by=admin,
    )
    with ThreadPoolExecutor(1) as pool:  # Playwright's loop owns this thread
        pool.submit(asyncio.run, send_changed(redis_url, run.pk)).result()
    # on top, live: by the broadcast, or by the socket's first render if it connects later
    new_row = page.locator("#runs-body > tr").first
    expect(new_row).to_have_id(f"run-{run.pk}")
    expect(new_row).to_contain_text("Pending")
    expect(page.locator("#runs-body > tr")).to_have_count(2)
    page.get_by_role("link", name=f"#{run.pk}", exact=True).click()
    page.wait_for_url(f"{live_server_url}/runs/{run.pk}/")
    header = page.locator("#run-header")
    expect(header).to_contain_text("Pending")
    expect(page.get_by_role("button", name="Halt run")).to_be_visible()
    assert page.locator("#step-1").count() == 0
    page.evaluate("window.stillTheSamePage = true")

    while not Run.objects.get(pk=run.pk).is_final:
        run_advance(run.pk)
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, send_changed(redis_url, run.pk)).result()

    expect(page.locator("#step-1")).to_contain_text("orders.lookup")
    expect(page.locator("#step-1")).to_contain_text("I need the order")
    expect(page.locator("#step-2")).to_contain_text("untrusted input")
    expect(header).to_contain_text("Completed")
    expect(header).to_contain_text("100%")
    expect(page.locator("#run-timeline")).to_contain_text("Run completed.")
    expect(page.get_by_role("button", name="Halt run")).to_have_count(0)
    assert page.evaluate("window.stillTheSamePage") is True  # swapped in, not reloaded
    if os.environ.get("BATON_SCREENSHOTS"):
        path = Path(os.environ["BATON_SCREENSHOTS"]) / "run-detail.png"
        page.screenshot(path=str(path), full_page=True)
