"""Tools and workflows of the outage tests.

Every execution of a tool body is journalled (start, end, the worker it ran for), in memory and,
when ``BATON_ATTACK_JOURNAL`` names a file, there too (a real worker process writes it)."""

import os
import threading
import time
from collections import Counter, defaultdict

from django.db import connection, transaction

from orchestration.demo.models import InfraChange
from orchestration.engine import steps
from orchestration.registry.declare import tool, workflow

KIND = "outage"
JOURNAL_ENV = "BATON_ATTACK_JOURNAL"
LABEL = {
    "type": "object",
    "properties": {"label": {"type": "string"}, "seconds": {"type": "number"}},
    "required": ["label"],
    "additionalProperties": False,
}

CALLS: Counter[str] = Counter()  # label -> executions that reached the effect
JOURNAL: list[dict] = []  # one entry per execution: label, key, worker, began, ended
PLANS: dict[str, list[str]] = defaultdict(list)  # label -> what execution N meets
OUTAGE = {"on": False, "refused": 0}  # the worker's renewals of its lease are refused meanwhile
RELEASE = threading.Event()  # lets overrunning calls end at a test's teardown


class Died(BaseException):
    """The worker process dies here (SIGKILL, OOM, a hard time limit, ``stop_process``):
    nothing after this point runs in it."""


def reset() -> None:
    CALLS.clear()
    JOURNAL.clear()
    PLANS.clear()
    RELEASE.clear()
    OUTAGE.update(on=False, refused=0)


def worker_of_this_thread() -> str:
    """The tool runs on the helper thread of the worker that advances the run (named after it
    by the tests' per-worker pools); in a real worker process, the pid."""
    name = threading.current_thread().name
    return name.split("helper-of-", 1)[1].rsplit("_", 1)[0] if "helper-of-" in name else name


def _journal(line: str) -> None:
    path = os.environ.get(JOURNAL_ENV)
    if path:
        with open(path, "a") as journal:
            journal.write(line + "\n")


def make_effect(label: str, key: str) -> dict:
    change, _ = InfraChange.objects.get_or_create(
        idempotency_key=key, defaults={"kind": KIND, "target": label}
    )
    CALLS[label] += 1
    return {"change_id": change.pk, "label": label}


def _begin(label: str, key: str) -> dict:
    entry = {
        "label": label,
        "key": key,
        "worker": worker_of_this_thread(),
        "began": time.monotonic(),
        "ended": None,
    }
    JOURNAL.append(entry)
    _journal(f"start {key} {os.getpid()} {entry['began']:.6f}")
    return entry


def _end(entry: dict) -> None:
    entry["ended"] = time.monotonic()
    _journal(f"end {entry['key']} {os.getpid()} {entry['ended']:.6f}")


@tool("outage.effect", side_effect="write", schema=LABEL)
def effect(*, label: str, idempotency_key: str, seconds: float = 0) -> dict:
    """An idempotent, visible effect."""
    entry = _begin(label, idempotency_key)
    time.sleep(seconds)
    out = make_effect(label, idempotency_key)
    _end(entry)
    return out


@tool("outage.slow", side_effect="write", timeout=600, schema=LABEL)
def slow(*, label: str, idempotency_key: str, seconds: float = 1.0) -> dict:
    """A legitimately long effect (its timeout, 600 s, allows it): ``seconds`` long."""
    entry = _begin(label, idempotency_key)
    time.sleep(seconds / 2)
    out = make_effect(label, idempotency_key)
    time.sleep(seconds / 2)
    _end(entry)
    return out


@tool("outage.overrun", side_effect="write", timeout=0.3, schema=LABEL)
def overrun(*, label: str, idempotency_key: str, seconds: float = 3.0) -> dict:
    """Overruns its 0.3 s timeout and keeps running (up to ``seconds``, or the test's end)."""
    entry = _begin(label, idempotency_key)
    try:
        RELEASE.wait(seconds)
        out = make_effect(label, idempotency_key)
        _end(entry)
        return out
    finally:
        connection.close()  # its thread was abandoned: nothing else closes its connection


@tool("outage.planned", side_effect="write", schema=LABEL)
def planned(*, label: str, idempotency_key: str, seconds: float = 0) -> dict:
    """Execution N meets ``PLANS[label][N]``: "outage" (the database refuses the worker's lease
    renewals while the step takes ``seconds``: the worker stops itself, and this execution ends
    with it), "fail" (the service it calls resets the connection), or "ok"."""
    entry = _begin(label, idempotency_key)
    n = sum(1 for e in JOURNAL if e["label"] == label)
    meets = PLANS[label][n - 1] if n <= len(PLANS[label]) else "ok"
    if meets == "outage":
        OUTAGE["on"] = True
        RELEASE.wait(seconds)
        OUTAGE["on"] = False
        _end(entry)
        raise Died(f"the worker executing {label} was stopped")  # its process is gone
    if meets == "fail":
        raise ConnectionError("the upstream service reset the connection")
    out = make_effect(label, idempotency_key)
    _end(entry)
    return out


def deterministic_database_error() -> None:
    """A query the database refuses every time with an OperationalError: on PostgreSQL a
    statement over its statement_timeout (QueryCanceled), on SQLite a missing table."""
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL statement_timeout = '20ms'")
            cursor.execute("SELECT pg_sleep(0.2)")
        else:
            cursor.execute("SELECT * FROM outage_no_such_table")


@tool("outage.report", side_effect="read", schema=LABEL)
def report(*, label: str, idempotency_key: str, seconds: float = 0) -> dict:
    """A report whose query always exceeds the database's statement timeout."""
    entry = _begin(label, idempotency_key)
    CALLS[label] += 1
    deterministic_database_error()
    _end(entry)
    return {"rows": 0}


def refusing_lease_expiry(now):
    """``steps.lease_expiry`` as seen by a worker whose lease renewals the database refuses
    during an outage (the renewal's query fails)."""
    if OUTAGE["on"]:
        OUTAGE["refused"] += 1
        from django.db import OperationalError

        raise OperationalError("server closed the connection unexpectedly")
    return ORIGINAL_LEASE_EXPIRY(now)


ORIGINAL_LEASE_EXPIRY = steps.lease_expiry


@workflow("outage.one", tools=["outage.*"])
def one(ctx, tool: str = "outage.effect", label: str = "one", seconds: float = 0) -> dict:
    return ctx.tool(tool, label=label, seconds=seconds)


@workflow("outage.two", tools=["outage.*"])
def two(ctx, label: str = "two") -> dict:
    first = ctx.tool("outage.effect", label=f"{label}-1")
    second = ctx.tool("outage.effect", label=f"{label}-2")
    return {"changes": [first["change_id"], second["change_id"]]}


@workflow("outage.raw_sql", tools=["outage.*"])
def raw_sql(ctx, label: str = "raw") -> dict:
    """Workflow code (not a step) whose own query the database always refuses."""
    first = ctx.tool("outage.effect", label=label)
    deterministic_database_error()
    return first
