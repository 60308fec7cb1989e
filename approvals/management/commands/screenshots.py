"""Screenshots of the queue and a request page for the README, taken from the running demo.

    make run                                   # in one terminal
    .venv/bin/python manage.py screenshots     # in another (Playwright comes with make test)

Logs in as the demo reviewer (password from var/demo-logins.json), opens the approval queue and
its first request in Chromium, and writes docs/screenshots/queue.png and request.png."""

import json
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


class Command(BaseCommand):
    help = "Screenshot the approval queue and a request page of the running demo for the README."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--base-url", default="http://127.0.0.1:8000")
        parser.add_argument("--out", default=str(settings.BASE_DIR / "docs" / "screenshots"))
        parser.add_argument("--chromium", default="/usr/bin/chromium")
        parser.add_argument("--user", default="reviewer")

    def handle(self, *args, base_url: str, out: str, chromium: str, user: str, **options):
        try:
            from playwright.sync_api import sync_playwright
        except ImportError as exc:
            raise CommandError("Playwright is a dev dependency: run `make test` once.") from exc
        logins = Path(settings.VAR_DIR) / "demo-logins.json"
        if not logins.exists():
            raise CommandError("No demo logins: start the demo with `make run` first.")
        password = json.loads(logins.read_text()).get(user)
        if not password:
            raise CommandError(f"No demo password for {user!r} in {logins}.")
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"{base_url}/login/")
            page.get_by_label("Username").fill(user)
            page.get_by_label("Password").fill(password)
            page.get_by_role("button", name="Log in").click()
            page.wait_for_url(f"{base_url}/approvals/")
            rows = page.locator("tr.queue-row")
            rows.first.wait_for(timeout=15000)
            page.wait_for_timeout(1000)  # the live list has arrived over the websocket
            page.screenshot(path=str(out_dir / "queue.png"))
            rows.first.locator("a").first.click()
            page.wait_for_url(f"{base_url}/approvals/*/")
            page.wait_for_timeout(1000)
            page.screenshot(path=str(out_dir / "request.png"), full_page=True)
            browser.close()
        self.stdout.write(f"Wrote {out_dir / 'queue.png'} and {out_dir / 'request.png'}.")
