"""The README's screenshot command, against Daphne with the demo users."""

from pathlib import Path

import pytest
from django.core.management import call_command

from approvals.demo import demo_seed
from approvals.queue.models import ApprovalRequest
from orchestration.runs.models import Run
from tests.services import CHROMIUM, absent, require_browser

pytestmark = [pytest.mark.browser, pytest.mark.redis]


def test_the_screenshot_command_captures_the_queue_and_a_request(
    live_server_url, tmp_path, monkeypatch
):
    if not Path(CHROMIUM).exists():
        absent(f"no Chromium at {CHROMIUM}", required=require_browser())
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")  # Playwright's loop in this thread
    demo_seed()
    run = Run.objects.first()
    ApprovalRequest.objects.create(
        run_id=run.pk,
        step_seq=99,
        tool="payments.refund",
        args={"order_id": "A-1004", "amount": 1899},
        team="finance",
    )
    call_command("screenshots", base_url=live_server_url, out=str(tmp_path), chromium=CHROMIUM)
    for name in ("queue.png", "request.png"):
        image = (tmp_path / name).read_bytes()
        assert image.startswith(b"\x89PNG") and len(image) > 10_000
