"""Live latency of the approval queue: how long a proposed action takes to reach reviewers'
screens, how long an approval takes to resume the run, beside the bare channel-layer round trip
measured in the same run.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/baton_live REDIS_URL=redis://127.0.0.1:6379/3 \\
        .venv/bin/python bench/live.py [ACTIONS]

ACTIONS defaults to 200. Needs PostgreSQL and Redis (it refuses without them) and the
``websockets`` client, which the ``bench`` extra brings
(``.venv/bin/python -m pip install -c constraints.txt -e ".[bench]"``). It creates and drops a
scratch database on the server of DATABASE_URL (``BENCH_LIVE_DATABASE``, default
``test_baton_bench_live_<pid>``; it is clobbered if it exists), starts (and stops) its own Celery
worker on a private queue with the policy gate (``BATON_GATE=approvals.policy.gate.PolicyGate``)
and its own Daphne, both with ``tests.settings`` on the scratch database (``BATON_TEST_LIVE=1``,
``BATON_TEST_DATABASE_NAME``) and the Redis of REDIS_URL for Celery and the channel layer, and
connects 20 websocket clients to ``ws/approvals/`` as reviewers of the finance team (session
cookies made with Django's ``SessionStore`` in the scratch database). Give it a Redis database
nobody else uses: at the end it flushes the channel layer's keys in that database.

Each action is the demo's ``customer_refund`` of order A-1004 (after ``demo_data_seed()`` and
``policy_seed()``): its refund of 1899 asks finance. Times are wall-clock (``time.time()`` and the
database's timestamps, all written on this machine):

- propose_to_screen: from the proposal, the ``created_at`` of the ApprovalRequest the policy
  gate opens on the worker (stamped inside its transaction, so the commit is included), to the
  moment each of the 20 clients receives a text frame naming the request's row (``req-<id>``),
  stamped by the client's reader as the frame arrives. The figure per action is the slowest of
  the 20 clients; p50/p99 are over actions. The worker's run up to the gate is not included.
- decide_to_resume: from the decision, the ``decided_at`` of the request as ``approval_decide``
  (approve, called in this process once the run is waiting) stamps it inside its transaction, to
  the moment this process sees the worker's restart of the decided step committed (the
  refund step leaves ``waiting``: the worker took the run's lease, replayed it, asked the gate
  again and is about to execute the approved refund; polled every 2 ms).
- baseline: ``group_send`` on a group only this bench's plain ``RedisChannelLayer`` channel is in,
  to ``receive`` on that channel; one sample per action, in the same run.

One action warms the worker up before the clients connect, and one more warms Daphne up; neither
is counted. While a proposal travels this process does not poll the database (it waits for the
screens). Between actions the run is awaited to its end (its later ask, the customer's email for
operations, is approved by a reviewer who is not a client) and the order's refunds are deleted,
so that the next action asks again. Prints ``propose_to_screen p50_ms=X p99_ms=Y``,
``decide_to_resume ...`` and ``baseline ...``, each line's ratio to the baseline's percentiles,
and context lines: the fastest client per action, and decide_to_next_step (the decision to the
start of the step after the refund: the old, longer definition, which includes executing the
refund and the next gate review).
"""

import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.services import require_services  # noqa: E402

GATE = "approvals.policy.gate.PolicyGate"
CLIENTS = 20
POLL_SECONDS = 0.002


def _refuse(message: str) -> None:
    sys.exit(f"bench/live.py: {message}")


def _preflight() -> None:
    """Both services are set and answering, and a websocket client is at hand."""
    require_services("bench/live.py", redis_example="redis://127.0.0.1:6379/3")
    try:
        import websockets  # noqa: F401
    except ImportError:
        _refuse("the websockets library is missing from the venv")


if __name__ == "__main__":
    _preflight()
    os.environ.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        BATON_TEST_LIVE="1",
        BATON_GATE=GATE,
        BATON_VAR_DIR=tempfile.mkdtemp(prefix="baton-bench-live-"),
    )
    os.environ.setdefault("LOG_LEVEL", "WARNING")

import django  # noqa: E402

django.setup()

from django.db import connection  # noqa: E402

LAUNCHER = """
import sys
import django
django.setup()
from config.celery import app
queue, hostname = sys.argv[1], sys.argv[2]
app.conf.task_default_queue = queue
app.worker_main(["worker", "--pool=solo", "--loglevel=WARNING", "-n", hostname, "-Q", queue,
                 "--without-gossip", "--without-mingle"])
"""


def _env() -> dict[str, str]:
    env = os.environ.copy()
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        BATON_TEST_LIVE="1",
        BATON_GATE=GATE,
        BATON_TEST_DATABASE_NAME=str(connection.settings_dict["NAME"]),
        PYTHONPATH=str(REPO),
    )
    return env


def _start(command: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=_env(),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _check(process: subprocess.Popen, log: Path, what: str) -> None:
    if process.poll() is not None:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the bench's {what} exited ({process.returncode}):\n{tail}")


def _wait(
    done, *, timeout: float = 30, check=None, what: str = "condition", poll: float = POLL_SECONDS
) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            if check:
                check()
            raise RuntimeError(f"{what}: not seen after {timeout:g}s")
        time.sleep(poll)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the websocket clients, on an event loop in a thread of this process ----------------------


class Clients:
    """CLIENTS websocket connections to ``ws/approvals/``; every text frame is kept with the
    wall-clock moment its reader got it. Waiters sleep on a condition the readers notify, so
    that no polling thread competes with the readers for the interpreter."""

    def __init__(self, port: int, cookies: list[str]):
        self.port, self.cookies = port, cookies
        self.messages: list[list[tuple[float, str]]] = [[] for _ in cookies]
        self.arrived = threading.Condition()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sockets: list = []
        self.readers: list = []

    def run(self, coroutine, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _connect(self) -> None:
        from django.conf import settings
        from websockets.asyncio.client import connect

        origin = f"http://127.0.0.1:{self.port}"
        for index, key in enumerate(self.cookies):
            socket = await connect(
                f"ws://127.0.0.1:{self.port}/ws/approvals/",
                origin=origin,
                additional_headers={"Cookie": f"{settings.SESSION_COOKIE_NAME}={key}"},
                max_size=None,
            )
            self.sockets.append(socket)
            self.readers.append(asyncio.create_task(self._read(index, socket)))

    async def _read(self, index: int, socket) -> None:
        async for message in socket:
            if isinstance(message, str):
                arrived = time.time()
                with self.arrived:
                    self.messages[index].append((arrived, message))
                    self.arrived.notify_all()

    def connect(self) -> None:
        self.run(self._connect())
        # each consumer renders the whole queue on accept
        self.wait(lambda: all(self.messages), timeout=30, what="the clients' first render")

    def mark(self) -> list[int]:
        """Where each client's messages stand now; ``seen`` looks only at later ones."""
        with self.arrived:
            return [len(messages) for messages in self.messages]

    def seen(self, request_id: int, mark: list[int]) -> list[float] | None:
        """When each client first got a fragment naming ``req-<id>`` after ``mark``."""
        pattern = re.compile(rf"req-{request_id}(?!\d)")
        times = []
        for messages, start in zip(self.messages, mark, strict=True):
            found = next((t for t, m in messages[start:] if pattern.search(m)), None)
            if found is None:
                return None
            times.append(found)
        return times

    def seen_after(self, newest: int, mark: list[int]) -> bool:
        """Whether every client got a fragment naming a request newer than ``newest``."""
        rows = re.compile(r'id="req-(\d+)"')
        return all(
            any(int(pk) > newest for _, m in messages[start:] for pk in rows.findall(m))
            for messages, start in zip(self.messages, mark, strict=True)
        )

    def wait(self, done, *, timeout: float, what: str, check=None):
        """Wait until ``done()`` (called under the readers' lock) returns something true."""
        deadline = time.monotonic() + timeout
        with self.arrived:
            while not (result := done()):
                left = deadline - time.monotonic()
                if left <= 0:
                    if check:
                        check()
                    closed = self.closed()
                    gone = f" ({closed} websocket clients were disconnected)" if closed else ""
                    raise RuntimeError(f"{what}: not seen after {timeout:g}s{gone}")
                self.arrived.wait(min(left, 0.5))
        return result

    def closed(self) -> int:
        return sum(1 for task in self.readers if task.done())

    async def _close(self) -> None:
        for socket in self.sockets:
            await socket.close()
        for task in self.readers:
            task.cancel()

    def close(self) -> None:
        try:
            self.run(self._close(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


class Baseline:
    """A plain RedisChannelLayer receiver channel in a group no consumer is in."""

    def __init__(self, clients: Clients):
        from channels_redis.core import RedisChannelLayer

        self.clients = clients
        self.layer = RedisChannelLayer(hosts=[os.environ["REDIS_URL"]])
        self.group = f"bench.live.{uuid.uuid4().hex[:8]}"
        self.channel = clients.run(self._setup())

    async def _setup(self) -> str:
        channel = await self.layer.new_channel()
        await self.layer.group_add(self.group, channel)
        return channel

    async def _round_trip(self) -> float:
        start = time.perf_counter()
        await self.layer.group_send(self.group, {"type": "bench.ping"})
        await self.layer.receive(self.channel)
        return time.perf_counter() - start

    def sample(self) -> float:
        return self.clients.run(self._round_trip())

    def close(self) -> None:
        self.clients.run(self.layer.group_discard(self.group, self.channel))
        self.clients.run(self.layer.flush())


# --- the setup in the scratch database --------------------------------------------------------


def _seed() -> tuple[object, list[object], list[str]]:
    from django.contrib.auth import (
        BACKEND_SESSION_KEY,
        HASH_SESSION_KEY,
        SESSION_KEY,
        get_user_model,
    )
    from django.contrib.auth.models import Group
    from django.contrib.sessions.backends.db import SessionStore

    from approvals.policy.seed import policy_seed
    from approvals.queue.models import ReviewerTeam
    from approvals.roles import REVIEWER
    from orchestration.demo.seed import demo_data_seed

    users = get_user_model()
    owner = users.objects.create_user("bench-owner")
    demo_data_seed(owner=owner)
    policy_seed()
    team = ReviewerTeam.objects.get_or_create(name="finance")[0]
    group = Group.objects.get(name=REVIEWER)
    reviewers, cookies = [], []
    for i in range(CLIENTS):
        user = users.objects.create_user(f"bench-reviewer-{i}", password=f"pw-{i}-bench-live")
        user.groups.add(group)
        team.members.add(user)
        session = SessionStore()
        session[SESSION_KEY] = str(user.pk)
        session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
        session[HASH_SESSION_KEY] = user.get_session_auth_hash()
        session.create()
        reviewers.append(user)
        cookies.append(session.session_key)
    # Not a client: approves the later ask of each run (the customer's email, for operations).
    operator = users.objects.create_user("bench-operations")
    operator.groups.add(group)
    ReviewerTeam.objects.get_or_create(name="operations")[0].members.add(operator)
    return owner, [*reviewers, operator], cookies


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ms = sorted(s * 1000 for s in samples)
    p99 = ms[min(len(ms) - 1, max(0, round(0.99 * len(ms) + 0.5) - 1))]
    return statistics.median(ms), p99


def one_action(owner, reviewer, operator, clients: Clients | None, check) -> dict[str, float]:
    """One proposal and its approval; returns the figures of this action in seconds (without
    ``clients``, only the decision's: to warm the worker up)."""
    from approvals.queue.models import OPEN, ApprovalRequest
    from approvals.queue.services import approval_decide
    from orchestration.demo.models import Refund
    from orchestration.runs.models import FINAL, Run, RunStatus, Step, StepStatus
    from orchestration.runs.services import run_start

    newest = ApprovalRequest.objects.order_by("-pk").values_list("pk", flat=True).first() or 0
    mark = clients.mark() if clients else []
    run = run_start(
        workflow="customer_refund",
        input={"order_id": "A-1004", "reason": "The laptop arrived with a cracked screen."},
        agent="refund-bot",
        intent={"goal": "Refund order A-1004"},
        started_by=owner,
    )
    requests = ApprovalRequest.objects.filter(run_id=run.pk)
    figures = {}
    if clients:
        # No polling of the database meanwhile: wait for the screens to show a newer request.
        clients.wait(
            lambda: clients.seen_after(newest, mark),
            timeout=10,
            check=check,
            what=f"the request of run {run.pk} on every screen",
        )
    else:
        _wait(requests.exists, check=check, what=f"the request of run {run.pk}", poll=0.005)
    request = requests.get()
    if clients:
        seen = clients.wait(
            lambda: clients.seen(request.pk, mark),
            timeout=10,
            check=check,
            what=f"req-{request.pk} on every screen",
        )
        proposed = request.created_at.timestamp()
        figures["propose_to_screen"] = max(seen) - proposed
        figures["first_screen"] = min(seen) - proposed

    # A reviewer decides once the run waits (its lease released): not before, as a human.
    waiting = Run.objects.filter(pk=run.pk, status=RunStatus.WAITING, lease_owner="")
    _wait(waiting.exists, check=check, what=f"run {run.pk} waiting", poll=0.005)
    step = Step.objects.get(run_id=run.pk, status=StepStatus.WAITING)
    decided = approval_decide(request=request.pk, reviewer=reviewer, verdict="approve")
    decided_at = decided.decided_at.timestamp()
    restarted = Step.objects.filter(pk=step.pk).exclude(status=StepStatus.WAITING)
    _wait(restarted.exists, check=check, what=f"run {run.pk} resuming")
    figures["decide_to_resume"] = time.time() - decided_at
    following = Step.objects.filter(run_id=run.pk, seq__gt=step.seq)
    _wait(following.exists, check=check, what=f"run {run.pk} going on")
    figures["decide_to_next_step"] = time.time() - decided_at

    finished = Run.objects.filter(pk=run.pk, status__in=FINAL)
    later = ApprovalRequest.objects.filter(run_id=run.pk, status__in=OPEN).exclude(pk=request.pk)
    deadline = time.monotonic() + 30
    while not finished.exists():  # a later step may ask too (the customer's email): approve it
        for pk in later.values_list("pk", flat=True):
            approval_decide(request=pk, reviewer=operator, verdict="approve")
        if time.monotonic() > deadline:
            check()
            state = Run.objects.get(pk=run.pk)
            steps = list(state.step_set.values_list("name", "status"))
            raise RuntimeError(f"run {run.pk} did not finish: {state.status} {steps}")
        time.sleep(0.005)
    Refund.objects.filter(order__order_id="A-1004").delete()  # the next action asks again
    return figures


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 200
    var_dir = Path(os.environ["BATON_VAR_DIR"])
    queue = f"bench-live-{uuid.uuid4().hex[:8]}"

    from config.celery import app

    app.conf.task_default_queue = queue
    scratch = os.environ.get("BENCH_LIVE_DATABASE") or f"test_baton_bench_live_{os.getpid()}"
    connection.settings_dict["TEST"]["NAME"] = scratch
    old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True)
    worker = daphne = clients = baseline = None
    figures: dict[str, list[float]] = defaultdict(list)
    worker_log, daphne_log = var_dir / "worker.log", var_dir / "daphne.log"
    try:
        owner, reviewers, cookies = _seed()
        hostname = f"bench-{queue}@localhost"
        worker = _start([sys.executable, "-c", LAUNCHER, queue, hostname], worker_log)
        port = _free_port()
        daphne = _start(
            [
                sys.executable,
                "-m",
                "daphne",
                "-b",
                "127.0.0.1",
                "-p",
                str(port),
                "config.asgi:application",
            ],
            daphne_log,
        )

        def check() -> None:
            _check(worker, worker_log, "worker")
            _check(daphne, daphne_log, "Daphne")

        def daphne_up() -> bool:
            check()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/login/", timeout=1).close()
                return True
            except OSError:
                return False

        from orchestration.workers import WorkerHeartbeat

        _wait(daphne_up, timeout=30, what="Daphne")
        _wait(WorkerHeartbeat.objects.filter(hostname=hostname).exists, timeout=60, check=check)
        # Warm the worker up before the clients connect, so that they are not left idle while
        # it starts: with redis-py 8 the channel layer's socket timeout defaults to 5 s, the
        # length of channels_redis's blocking receive, and an idle consumer can be dropped
        # unless the settings raise it (django/channels_redis#422).
        one_action(owner, reviewers[0], reviewers[-1], None, check)
        clients = Clients(port, cookies)
        clients.connect()
        baseline = Baseline(clients)

        one_action(owner, reviewers[0], reviewers[-1], clients, check)  # warm up
        baseline.sample()
        for i in range(n):
            action = one_action(owner, reviewers[i % CLIENTS], reviewers[-1], clients, check)
            for name, seconds in action.items():
                figures[name].append(seconds)
            figures["baseline"].append(baseline.sample())
        if clients.closed():
            raise RuntimeError(f"{clients.closed()} websocket clients were disconnected")
    except Exception:
        for log in (daphne_log, worker_log):  # what the services said, before they are removed
            if log.exists():
                tail = log.read_text(errors="replace")[-4000:]
                print(f"--- the end of {log.name}:\n{tail}", file=sys.stderr)
        raise
    finally:
        if baseline is not None:
            baseline.close()
        if clients is not None:
            clients.close()
        _stop(worker)
        _stop(daphne)
        _forget_queue(queue)
        with connection.cursor() as cursor:  # sessions left by Daphne's or the worker's threads
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        connection.creation.destroy_test_db(old_name, verbosity=0)
        shutil.rmtree(var_dir, ignore_errors=True)

    print(
        f"\nactions={n} (after two warm-ups) clients={CLIENTS} database={connection.vendor} "
        f"scratch={scratch} worker=solo gate={GATE} cpus={os.cpu_count()}"
    )
    print(
        "propose_to_screen: request created_at -> the slowest of the clients' frames; "
        "decide_to_resume: decided_at -> the decided step restarted by the worker"
    )
    base50, base99 = _percentiles(figures["baseline"])
    for name in ("propose_to_screen", "decide_to_resume", "baseline"):
        p50, p99 = _percentiles(figures[name])
        print(f"{name} p50_ms={p50:.1f} p99_ms={p99:.1f}")
    for name in ("propose_to_screen", "decide_to_resume"):
        p50, p99 = _percentiles(figures[name])
        print(f"{name} vs baseline: p50 x{p50 / base50:.1f} p99 x{p99 / base99:.1f}")
    for name, meaning in (
        ("first_screen", "created_at -> the fastest client's frame"),
        ("decide_to_next_step", "decided_at -> the step after the refund started"),
    ):
        p50, p99 = _percentiles(figures[name])
        print(f"context {name} p50_ms={p50:.1f} p99_ms={p99:.1f} ({meaning})")
    for name in ("propose_to_screen", "decide_to_resume"):
        ms = sorted(s * 1000 for s in figures[name])
        print(f"context {name} max_ms={ms[-1]:.1f} over {len(ms)} actions")


def _forget_queue(queue: str) -> None:
    import redis

    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")


if __name__ == "__main__":
    main()
