"""Tools and workflows of ``test_refusals.py``."""

import time
from collections import Counter

from django.db import connection, transaction

from orchestration.demo.models import InfraChange
from orchestration.registry.declare import tool, workflow
from tests.orchestration.engine.outages.workflows import Died

LABEL = {
    "type": "object",
    "properties": {"label": {"type": "string"}, "seconds": {"type": "number"}},
    "required": ["label"],
    "additionalProperties": False,
}

CALLS: Counter[str] = Counter()  # label -> executions of a tool body
SWALLOWED: list[str] = []  # what a workflow's `except Exception` caught


def reset() -> None:
    CALLS.clear()
    SWALLOWED.clear()


def _effect(label: str, key: str) -> dict:
    change, _ = InfraChange.objects.get_or_create(
        idempotency_key=key, defaults={"kind": "refusal", "target": label}
    )
    return {"change_id": change.pk, "label": label}


@tool("refusal.effect", side_effect="write", schema=LABEL)
def effect(*, label: str, idempotency_key: str, seconds: float = 0) -> dict:
    CALLS[label] += 1
    time.sleep(seconds)
    return _effect(label, idempotency_key)


@tool("refusal.big_report", side_effect="read", schema=LABEL)
def big_report(*, label: str, idempotency_key: str, seconds: float = 0) -> dict:
    """A report whose sort spills past the server's temp_file_limit every time: PostgreSQL
    refuses it with SQLSTATE 53400 (configuration_limit_exceeded), as deterministic as a
    statement timeout."""
    CALLS[label] += 1
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL work_mem = '64kB'")
        cursor.execute("SET LOCAL temp_file_limit = '64kB'")
        cursor.execute("SELECT g FROM generate_series(1, 200000) g ORDER BY g DESC")
        rows = cursor.fetchall()
    return {"rows": len(rows)}


@tool("refusal.crash", side_effect="write", schema=LABEL)
def crash(*, label: str, idempotency_key: str, seconds: float = 0) -> dict:
    """Kills the worker process executing it, every time (an OOM kill, a segfault in a C
    extension): nothing after this point runs in that process."""
    CALLS[label] += 1
    raise Died(f"the worker executing {label} was killed")


@workflow("refusal.one", tools=["refusal.*"])
def one(ctx, tool: str = "refusal.effect", label: str = "one", seconds: float = 0) -> dict:
    return ctx.tool(tool, label=label, seconds=seconds)


@workflow("refusal.atomic", tools=["refusal.*"])
def atomic(ctx, label: str = "atomic", count: int = 3) -> dict:
    """Workflow code that keeps its own writes and its steps together in one transaction."""
    with transaction.atomic():
        changes = [
            ctx.tool("refusal.effect", label=f"{label}-{i}")["change_id"] for i in range(count)
        ]
    return {"changes": changes}


@workflow("refusal.atomic_refused", tools=["refusal.*"])
def atomic_refused(ctx, label: str = "refused") -> dict:
    """Workflow code whose own write, in the transaction around a step, is refused."""
    with transaction.atomic():
        first = ctx.tool("refusal.effect", label=label)
        raise ValueError("the workflow's own bookkeeping failed")
    return first


@workflow("refusal.swallows", tools=["refusal.*"])
def swallows(ctx, label: str = "swallow", seconds: float = 1.0) -> dict:
    first = ctx.tool("refusal.effect", label=f"{label}-1", seconds=seconds)
    try:
        second = ctx.tool("refusal.effect", label=f"{label}-2")
    except Exception as exc:  # what a workflow author writes
        SWALLOWED.append(f"{type(exc).__name__}: {exc}")
        second = {"change_id": None}
    return {"changes": [first["change_id"], second["change_id"]]}


@workflow("refusal.approved", tools=["refusal.*"])
def approved(ctx, label: str = "approved") -> dict:
    return ctx.tool("refusal.effect", label=label)


@workflow("refusal.approved_or_fallback", tools=["refusal.*"])
def approved_or_fallback(ctx, label: str = "fallback") -> dict:
    """What a workflow author writes around an action that may be refused."""
    try:
        return ctx.tool("refusal.effect", label=label)
    except Exception as exc:
        SWALLOWED.append(f"{type(exc).__name__}: {exc}")
        return {"skipped": True}
