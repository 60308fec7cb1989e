"""Engine throughput: a 50-step workflow of no-op tools through the durable engine, beside the
same 50 steps as a bare Celery chain doing the same durable writes, and beside LangGraph with its
PostgreSQL checkpointer, all on one PostgreSQL database.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/baton REDIS_URL=redis://127.0.0.1:6379/2 \\
        .venv/bin/python bench/engine.py [STEPS] [RUNS] [--profile]

Needs PostgreSQL and Redis (it refuses without them) and the ``bench`` extra for LangGraph
(``.venv/bin/python -m pip install -e ".[bench]"``). It creates and drops a scratch database,
and starts (and stops) its own Celery worker on a private queue: a ``python -c`` launcher sets
Django up with ``tests.settings`` on the scratch database (``BATON_TEST_LIVE=1``,
``BATON_TEST_DATABASE_NAME``), imports this module (the no-op tool and workflow, and the chain's
task), and runs ``app.worker_main`` with ``--pool=solo --without-gossip --without-mingle`` and
the project's CELERY_* settings. The engine and the chain run on that same worker. The gate is
the allow-all gate, so that the engine's own cost is measured, not a policy's.

- engine: ``run_start`` of a workflow calling ``ctx.tool`` STEPS times, then the worker's
  ``advance_run``: lease, step start/finish rows, events, broadcasts, fencing.
- celery_chain: a ``celery.chain`` of STEPS tasks; each calls the same no-op tool and inserts one
  completed ``Step`` row (one transaction), with no replay, lease or fencing.
- langgraph: STEPS no-op nodes in a line, compiled with ``PostgresSaver`` on the scratch database
  and run in this process with ``durability="sync"`` (each checkpoint committed before the next
  node, as the engine commits each step); the library's default ``"async"`` is shown as context.

Each variant runs once to warm up, then RUNS times (default 5), interleaved. Wall time runs from
the enqueue (``run_start``, the chain's ``apply_async``, ``invoke``) to the completion seen in the
database (polled every 5 ms for the two that run on the worker). Rates come from the median run.
Prints absolute figures (per-variant times, PostgreSQL sessions opened per run), then
``engine steps/s``, ``celery_chain steps/s``, ``langgraph steps/s``, ``overhead ratio`` (engine
time over the chain's) and ``vs langgraph`` (engine time over LangGraph's).

``--profile`` also advances runs in this process with ``run_advance`` (no worker) and prints, per
phase (step_start, step_finish, broadcast_run, ...), self time, SQL statements and
commits, the statements by kind, and what-if timings with bench-only monkeypatches (broadcasts
stubbed out; tool schemas checked by a cached validator). Engine files are not changed.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.services import require_services  # noqa: E402

ALLOW_ALL = "orchestration.gate.AllowAllGate"
POLL_SECONDS = 0.005


def _refuse(message: str) -> None:
    sys.exit(f"bench/engine.py: {message}")


def _preflight() -> None:
    """Both services are set and answering, before Django reads its settings."""
    require_services("bench/engine.py", redis_example="redis://127.0.0.1:6379/2")


if __name__ == "__main__":
    _preflight()
    os.environ.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        BATON_TEST_LIVE="1",  # Redis broker and channel layer, as in the worker
        BATON_GATE=ALLOW_ALL,  # the engine's own cost, not a policy's
        BATON_VAR_DIR=tempfile.mkdtemp(prefix="baton-bench-engine-"),
    )
    os.environ.setdefault("LOG_LEVEL", "WARNING")
else:  # imported by the bench's worker, which was given the same environment
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

import django  # noqa: E402

django.setup()

import jsonschema  # noqa: E402
from celery import chain, shared_task  # noqa: E402
from django.db import connection  # noqa: E402
from django.utils import timezone  # noqa: E402

from orchestration.registry.declare import tool, workflow  # noqa: E402
from orchestration.runs.models import FINAL, Run, RunStatus, Step, StepKind, StepStatus  # noqa: E402

TOOL = "_bench.noop"
WORKFLOW = "_bench.noop_steps"
CHAIN_TASK = "bench.engine.chain_step"


@tool(
    TOOL,
    side_effect="read",
    schema={
        "type": "object",
        "properties": {"i": {"type": "integer"}},
        "required": ["i"],
        "additionalProperties": False,
    },
)
def noop(*, i: int, idempotency_key: str) -> dict:
    """Does nothing; returns its argument."""
    return {"i": i}


@workflow(
    WORKFLOW,
    tools=[TOOL],
    input_schema={
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 1}},
        "required": ["n"],
    },
)
def noop_steps(ctx, n: int) -> dict:
    """Calls the no-op tool n times."""
    for i in range(n):
        ctx.tool(TOOL, i=i)
    return {"steps": n}


@shared_task(name=CHAIN_TASK, ignore_result=True)
def chain_step(run_id: int, seq: int) -> None:
    """One link of the baseline chain: the same tool call, then one completed Step row."""
    started = timezone.now()
    output = noop(i=seq - 1, idempotency_key=f"run-{run_id}-step-{seq}")
    Step.objects.create(
        run_id=run_id,
        seq=seq,
        kind=StepKind.TOOL,
        name=TOOL,
        input={"args": {"i": seq - 1}},
        output=output,
        status=StepStatus.COMPLETED,
        attempt=1,
        idempotency_key=f"run-{run_id}-step-{seq}",
        started_at=started,
        finished_at=timezone.now(),
    )


# --- the worker -------------------------------------------------------------------------------

LAUNCHER = """
import sys
import django
django.setup()
import bench.engine  # the no-op tool and workflow, and the chain's task
from config.celery import app
queue, hostname = sys.argv[1], sys.argv[2]
app.conf.task_default_queue = queue
app.worker_main(["worker", "--pool=solo", "--loglevel=WARNING", "-n", hostname, "-Q", queue,
                 "--without-gossip", "--without-mingle"])
"""


class Worker:
    """One Celery worker process on a private queue, the same for the engine and the chain."""

    def __init__(self, queue: str, var_dir: Path):
        self.queue = queue
        self.hostname = f"bench-{queue}@localhost"
        self.log = var_dir / "worker.log"
        env = os.environ.copy()
        env.update(
            DJANGO_SETTINGS_MODULE="tests.settings",
            BATON_TEST_LIVE="1",
            BATON_TEST_DATABASE_NAME=str(connection.settings_dict["NAME"]),
            PYTHONPATH=str(REPO),
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, queue, self.hostname],
            cwd=REPO,
            env=env,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def check(self) -> None:
        if self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the bench's worker exited ({self.process.returncode}):\n{tail}")

    def wait_ready(self, timeout: float = 60) -> None:
        from orchestration.workers import WorkerHeartbeat  # written on worker_ready

        deadline = time.monotonic() + timeout
        while not WorkerHeartbeat.objects.filter(hostname=self.hostname).exists():
            self.check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the bench's worker was not ready after {timeout:g}s")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _wait(worker: Worker, done, *, timeout: float = 120) -> float:
    """Poll the database until ``done()``; returns the moment it was seen."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            worker.check()
            raise RuntimeError(f"not complete after {timeout:g}s")
        time.sleep(POLL_SECONDS)
    return time.perf_counter()


# --- the variants ----------------------------------------------------------------------------


def engine_run(worker: Worker, n: int) -> float:
    from orchestration.runs.services import run_start

    start = time.perf_counter()
    run = run_start(workflow=WORKFLOW, input={"n": n})
    finished = Run.objects.filter(pk=run.pk, status__in=FINAL)
    end = _wait(worker, finished.exists)
    run.refresh_from_db()
    if run.status != RunStatus.COMPLETED or run.steps != n:
        raise RuntimeError(f"engine run {run.pk} ended {run.status} ({run.steps}): {run.error}")
    return end - start


def chain_run(worker: Worker, n: int) -> float:
    run = Run.objects.create(workflow="_bench.chain", workflow_version=1, status=RunStatus.RUNNING)
    start = time.perf_counter()
    chain(chain_step.si(run.pk, seq) for seq in range(1, n + 1)).apply_async()
    end = _wait(worker, Step.objects.filter(run_id=run.pk, seq=n).exists)
    if Step.objects.filter(run_id=run.pk).count() != n:
        raise RuntimeError(f"chain run {run.pk} wrote the wrong number of steps")
    return end - start


def langgraph_graph(n: int, saver):
    from typing import TypedDict

    from langgraph.graph import END, START, StateGraph

    class State(TypedDict):
        last: int

    def node(k: int):
        def step(state: State) -> dict:
            return {"last": k}

        return step

    graph = StateGraph(State)
    for k in range(n):
        graph.add_node(f"step_{k}", node(k))
        graph.add_edge(START if k == 0 else f"step_{k - 1}", f"step_{k}")
    graph.add_edge(f"step_{n - 1}", END)
    return graph.compile(checkpointer=saver)


def langgraph_run(graph, saver, n: int, durability: str) -> float:
    config = {"configurable": {"thread_id": uuid.uuid4().hex}, "recursion_limit": n + 10}
    start = time.perf_counter()
    state = graph.invoke({"last": -1}, config, durability=durability)
    end = time.perf_counter()
    checkpoints = sum(1 for _ in saver.list(config))
    if state["last"] != n - 1 or checkpoints < n:
        raise RuntimeError(f"langgraph run ended at {state} with {checkpoints} checkpoints")
    return end - start


def _langgraph_saver(database: str):
    """LangGraph's PostgreSQL checkpointer on the scratch database (a context manager)."""
    try:
        import psycopg
        from langgraph.checkpoint.postgres import PostgresSaver
    except ImportError as exc:
        _refuse(
            f"LangGraph is missing ({exc}); install the bench extra: "
            '.venv/bin/python -m pip install -e ".[bench]"'
        )
    conninfo = psycopg.conninfo.make_conninfo(os.environ["DATABASE_URL"], dbname=database)
    return PostgresSaver.from_conn_string(conninfo)


# --- the profile -----------------------------------------------------------------------------


class Phases:
    """Self time, calls and queries per phase of ``run_advance``, by wrapping the functions it
    looks up at module level (the engine's files are not changed)."""

    def __init__(self):
        self.stack: list[list] = []  # [name, started, time spent in child phases]
        self.self_time: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.queries: Counter[str] = Counter()
        self.query_time: Counter[str] = Counter()
        self.statements: dict[str, Counter[str]] = defaultdict(Counter)
        self.commits: Counter[str] = Counter()
        self.commit_time: Counter[str] = Counter()
        self._patched: list[tuple[object, str, object]] = []

    @property
    def current(self) -> str:
        return self.stack[-1][0] if self.stack else "other"

    def wrap(self, module, attribute: str, name: str) -> None:
        original = getattr(module, attribute)

        def timed(*args, **kwargs):
            self.stack.append([name, time.perf_counter(), 0.0])
            try:
                return original(*args, **kwargs)
            finally:
                _, started, children = self.stack.pop()
                elapsed = time.perf_counter() - started
                self.self_time[name] += elapsed - children
                self.calls[name] += 1
                if self.stack:
                    self.stack[-1][2] += elapsed

        self._patched.append((module, attribute, original))
        setattr(module, attribute, timed)

    def replace(self, module, attribute: str, value) -> None:
        self._patched.append((module, attribute, getattr(module, attribute)))
        setattr(module, attribute, value)

    def unwrap(self) -> None:
        for module, attribute, original in reversed(self._patched):
            setattr(module, attribute, original)

    def execute(self, execute, sql, params, many, context):
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            self.queries[self.current] += 1
            self.query_time[self.current] += time.perf_counter() - started
            self.statements[self.current][_statement(sql)] += 1


def _statement(sql: str) -> str:
    """``VERB table`` for a statement, e.g. ``SELECT FOR UPDATE orchestration_run``."""
    words = sql.split()
    verb = words[0].upper() if words else "?"
    upper = [w.upper() for w in words]
    table = ""
    for keyword in ("FROM", "INTO", "UPDATE"):
        if keyword in upper[:-1]:
            table = words[upper.index(keyword) + 1].strip('"')
            break
    if verb == "SELECT" and "FOR UPDATE" in sql:
        verb = "SELECT FOR UPDATE"
    return f"{verb} {table}".strip()


def profile(n: int) -> None:
    """Advance n-step runs in this process with ``run_advance`` and print where the time goes:
    once as the product does it, once with ``broadcast_run`` stubbed out (a what-if)."""
    print(f"\nprofile: {n}-step runs advanced in this process by run_advance (no worker)")
    for broadcasts in (True, False):
        redis_before = _redis_connections_received()
        phases, total, captured = _profile_once(n, broadcasts=broadcasts)
        redis_opened = _redis_connections_received() - redis_before
        commits = sum(phases.commits.values())
        statements = sum(phases.queries.values())
        print(
            ("as shipped" if broadcasts else "what-if, broadcast_run stubbed out (bench only)")
            + f": {total * 1000:.1f} ms = {total / n * 1000:.2f} ms/step; "
            f"{statements} SQL statements ({statements / n:.1f}/step) in {commits} transactions "
            f"({commits / n:.1f}/step); CaptureQueriesContext saw {captured} entries "
            f"({captured / n:.1f}/step, with BEGIN/COMMIT); "
            f"{redis_opened} Redis connections opened (server-wide count)"
        )
        print("  phase             calls  self ms  ms/step  stmts    stmt ms  commits  commit ms")
        for name, spent in sorted(phases.self_time.items(), key=lambda item: -item[1]):
            print(
                f"  {name:<16} {phases.calls[name]:>6} {spent * 1000:>8.1f}"
                f" {spent / n * 1000:>8.2f} {phases.queries[name]:>8}"
                f" {phases.query_time[name] * 1000:>9.1f} {phases.commits[name]:>8}"
                f" {phases.commit_time[name] * 1000:>10.1f}"
            )
        if broadcasts:
            print("  statements by phase (count per run; BEGIN/COMMIT not listed):")
            for name, statements in phases.statements.items():
                listed = ", ".join(f"{sql} x{count}" for sql, count in statements.most_common())
                print(f"    {name}: {listed}")
    print("uninstrumented in-process runs (the tables above include the probes' own cost):")
    for label, what_if in [
        ("as shipped", {}),
        ("broadcast_run stubbed out", {"broadcasts": False}),
        ("and tool schemas validated by a cached validator", {"broadcasts": False, "cached": True}),
    ]:
        spent = _advance(n, **what_if)
        print(f"  {label}: {spent * 1000:.1f} ms = {spent / n * 1000:.2f} ms/step")


class _CachedJsonschema:
    """Stands in for the ``jsonschema`` module in ``orchestration.engine.context`` (what-if):
    one compiled validator per schema instead of ``jsonschema.validate``'s per-call schema check."""

    ValidationError = jsonschema.ValidationError

    def __init__(self):
        self._validators: dict[int, object] = {}

    def validate(self, instance, schema) -> None:
        validator = self._validators.get(id(schema))
        if validator is None:
            validator = jsonschema.validators.validator_for(schema)(schema)
            self._validators[id(schema)] = validator
        validator.validate(instance)


def _advance(n: int, *, broadcasts: bool = True, cached: bool = False) -> float:
    """One uninstrumented in-process run_advance of an n-step run, with optional what-ifs."""
    from orchestration.engine import context, runner, steps
    from orchestration.runs.services import DEFAULT_BUDGETS

    run = Run.objects.create(
        workflow=WORKFLOW, workflow_version=1, input={"n": n}, budgets=dict(DEFAULT_BUDGETS)
    )
    phases = Phases()  # only to undo the what-ifs
    if not broadcasts:
        for module in (steps, runner):
            phases.replace(module, "broadcast_run", lambda run_id: None)
    if cached:
        phases.replace(context, "jsonschema", _CachedJsonschema())
    try:
        start = time.perf_counter()
        outcome = runner.run_advance(run.pk)
        spent = time.perf_counter() - start
    finally:
        phases.unwrap()
    if outcome != RunStatus.COMPLETED:
        raise RuntimeError(f"run ended {outcome}")
    return spent


def _profile_once(n: int, *, broadcasts: bool) -> tuple[Phases, float, int]:
    from django.test.utils import CaptureQueriesContext

    from orchestration.engine import context, runner, steps
    from orchestration.runs.services import DEFAULT_BUDGETS

    run = Run.objects.create(
        workflow=WORKFLOW, workflow_version=1, input={"n": n}, budgets=dict(DEFAULT_BUDGETS)
    )
    phases = Phases()
    if not broadcasts:
        for module in (steps, runner):
            phases.replace(module, "broadcast_run", lambda run_id: None)
    for module, attribute in [
        (runner, "run_claim"),
        (runner, "_finish"),
        (context, "step_start"),
        (context, "call_with_timeout"),
        (context, "step_finish"),
        (steps, "broadcast_run"),
        (runner, "broadcast_run"),
    ]:
        phases.wrap(module, attribute, attribute.lstrip("_"))
    original_commit = connection.commit

    def commit():
        started = time.perf_counter()
        try:
            return original_commit()
        finally:
            phases.commits[phases.current] += 1
            phases.commit_time[phases.current] += time.perf_counter() - started

    connection.commit = commit
    try:
        with (
            CaptureQueriesContext(connection) as captured,
            connection.execute_wrapper(phases.execute),
        ):
            start = time.perf_counter()
            outcome = runner.run_advance(run.pk)
            total = time.perf_counter() - start
    finally:
        phases.unwrap()
        del connection.commit
    if outcome != RunStatus.COMPLETED:
        raise RuntimeError(f"profiled run ended {outcome}")
    phases.self_time["other"] = total - sum(phases.self_time.values())
    return phases, total, len(captured)


def _redis_connections_received() -> int:
    import redis

    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    return int(client.info("stats")["total_connections_received"])


# --- main ------------------------------------------------------------------------------------


def _median_rate(times: list[float], n: int) -> tuple[float, float]:
    median = statistics.median(times)
    return median, n / median


def _describe(name: str, times: list[float], n: int) -> str:
    ms = sorted(t * 1000 for t in times)
    return (
        f"{name:<16} median {statistics.median(ms):7.1f} ms  min {ms[0]:7.1f}  max {ms[-1]:7.1f}"
        f"  = {statistics.median(ms) / n:.2f} ms/step"
    )


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 50
    runs = int(args[1]) if len(args) > 1 else 5
    _langgraph_saver("postgres")  # refuses now, before any setup, if LangGraph is missing
    var_dir = Path(os.environ["BATON_VAR_DIR"])
    queue = f"bench-engine-{uuid.uuid4().hex[:8]}"

    from config.celery import app

    app.conf.task_default_queue = queue
    connection.settings_dict["TEST"]["NAME"] = f"test_baton_bench_engine_{os.getpid()}"
    old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True)
    database = str(connection.settings_dict["NAME"])
    worker = None
    times: dict[str, list[float]] = defaultdict(list)
    try:
        saver_context = _langgraph_saver(database)
        worker = Worker(queue, var_dir)
        with saver_context as saver:
            saver.setup()
            graph = langgraph_graph(n, saver)
            worker.wait_ready()
            variants = {
                "engine": lambda: engine_run(worker, n),
                "celery_chain": lambda: chain_run(worker, n),
                "langgraph": lambda: langgraph_run(graph, saver, n, "sync"),
                "langgraph_async": lambda: langgraph_run(graph, saver, n, "async"),
            }
            for measure in variants.values():  # warm up: imports, connections, plans
                measure()
            for _ in range(runs):
                for name, measure in variants.items():
                    times[name].append(measure())
        sessions = {
            "engine": _sessions_per_run(database, lambda: engine_run(worker, n)),
            "celery_chain": _sessions_per_run(database, lambda: chain_run(worker, n)),
        }
        worker.stop()
        with connection.cursor() as cursor:
            cursor.execute("SHOW synchronous_commit")
            synchronous_commit = cursor.fetchone()[0]
        if "--profile" in sys.argv:
            profile(n)
    finally:
        if worker is not None:
            worker.stop()
        _forget_queue(queue)
        connection.creation.destroy_test_db(old_name, verbosity=0)
        shutil.rmtree(var_dir, ignore_errors=True)

    print(
        f"\ndatabase={connection.vendor} synchronous_commit={synchronous_commit} "
        f"steps/run={n} runs={runs} (after one warm-up each) worker=solo, prefetch 1, acks late"
    )
    for name, measured in times.items():
        print(_describe(name, measured, n))
    print(
        "PostgreSQL sessions opened per run: "
        + ", ".join(f"{name} {count}" for name, count in sessions.items())
        + " (CELERY_DB_REUSE_MAX keeps the worker's connection across tasks)"
    )
    engine_s, engine_rate = _median_rate(times["engine"], n)
    chain_s, chain_rate = _median_rate(times["celery_chain"], n)
    graph_s, graph_rate = _median_rate(times["langgraph"], n)
    async_s, _ = _median_rate(times["langgraph_async"], n)
    print(f"vs langgraph durability=async (library default): {engine_s / async_s:.2f}")
    print(f"engine steps/s={engine_rate:.0f}")
    print(f"celery_chain steps/s={chain_rate:.0f}")
    print(f"langgraph steps/s={graph_rate:.0f}")
    print(f"overhead ratio: {engine_s / chain_s:.2f}")
    print(f"vs langgraph: {engine_s / graph_s:.2f}")


def _sessions_per_run(database: str, measure) -> int:
    """Sessions the server counted on the scratch database during one more run."""

    def sessions() -> int:
        time.sleep(1.5)  # ended sessions are counted when their backend exits
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            cursor.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s", [database])
            return cursor.fetchone()[0]

    before = sessions()
    measure()
    return sessions() - before


def _forget_queue(queue: str) -> None:
    """Remove the private queue's keys from Redis (its messages were all consumed)."""
    import redis

    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")


if __name__ == "__main__":
    main()
