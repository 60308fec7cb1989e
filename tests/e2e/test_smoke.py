"""The browser harness: Chromium driven by Playwright against Daphne in a process of its own.
Everything the user does goes through HTTP and the websocket."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from channels_redis.core import RedisChannelLayer
from django.utils import timezone
from playwright.sync_api import expect

from approvals.demo import demo_seed
from orchestration.broadcast import SYSTEM_GROUP
from orchestration.workers import WorkerHeartbeat

pytestmark = [pytest.mark.browser, pytest.mark.redis]


def login(page, base_url: str, username: str, password: str) -> None:
    page.goto(base_url + "/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()


def test_demo_reviewer_logs_in_and_lands_on_the_queue(page, live_server_url):
    reviewer = next(login for login in demo_seed() if login.username == "reviewer")

    login(page, live_server_url, reviewer.username, reviewer.password)

    page.wait_for_url(live_server_url + "/approvals/")
    assert page.get_by_role("heading", name="Approval queue").is_visible()
    nav = page.get_by_role("navigation", name="Main")
    assert nav.get_by_role("link").all_inner_texts() == ["Approval queue", "Runs"]
    assert page.evaluate("typeof htmx") == "object"  # scripts loaded under the CSP


def test_the_worker_banner_updates_live_over_the_websocket(page, live_server_url, redis_url):
    auditor = next(login for login in demo_seed() if login.username == "auditor")
    login(page, live_server_url, auditor.username, auditor.password)
    page.wait_for_url(live_server_url + "/audit/")
    banner = page.locator("#worker-status")
    assert "No worker is running" in banner.inner_text()

    WorkerHeartbeat.objects.create(hostname="w1", seen_at=timezone.now())
    with ThreadPoolExecutor(1) as pool:  # Playwright's loop owns this thread
        pool.submit(asyncio.run, send_status(redis_url)).result()

    expect(banner).not_to_contain_text("No worker", timeout=5000)


async def send_status(redis_url: str) -> None:
    layer = RedisChannelLayer(hosts=[redis_url])
    await layer.group_send(SYSTEM_GROUP, {"type": "system.status"})
