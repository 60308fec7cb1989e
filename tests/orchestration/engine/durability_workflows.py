"""Workflows and a tool for the durability tests (test_durability.py).

The test process imports this module, and so does the real Celery worker those tests start
(``celery worker --include tests.orchestration.engine.durability_workflows``): both processes
must know the workflow to run it and the tool to call it.

The tool makes one visible effect per call, an ``InfraChange`` row keyed by the step's
idempotency key, so a step re-executed after a crash finds its row instead of making a second
one. While the file named by ``BATON_DURABILITY_PAUSE`` exists, the tool pauses *after* its
insert has committed and before it returns (returning is what precedes ``step_finish``): the
test can then SIGKILL the worker, or halt the run, at exactly that point.
"""

import os
import time
from pathlib import Path

from orchestration.demo.models import InfraChange
from orchestration.registry.declare import tool, workflow

PAUSE_ENV = "BATON_DURABILITY_PAUSE"
KIND = "durability"
WORK_SECONDS = 0.04  # before and after the insert, so that a kill can land on either side
PAUSE_LIMIT_SECONDS = 90  # a safety net: a test that forgets the marker does not hang forever


def pause_file() -> Path | None:
    path = os.environ.get(PAUSE_ENV)
    return Path(path) if path else None


def hit_file(pause: Path) -> Path:
    """Written by the tool when it starts pausing; holds the step's idempotency key."""
    return pause.with_name(pause.name + ".hit")


@tool(
    "durability.effect",
    side_effect="write",
    timeout=PAUSE_LIMIT_SECONDS + 30,
    schema={
        "type": "object",
        "properties": {"target": {"type": "string", "minLength": 1}},
        "required": ["target"],
        "additionalProperties": False,
    },
)
def effect(*, target: str, idempotency_key: str) -> dict:
    """Make one idempotent effect (a row), keyed by the step's idempotency key."""
    time.sleep(WORK_SECONDS)
    # Autocommit: the row is committed when get_or_create returns.
    change, _ = InfraChange.objects.get_or_create(
        idempotency_key=idempotency_key, defaults={"kind": KIND, "target": target}
    )
    pause = pause_file()
    if pause is not None and pause.exists():
        hit = hit_file(pause)
        partial = hit.with_name(hit.name + ".tmp")
        partial.write_text(idempotency_key)
        partial.replace(hit)  # the test never reads a half-written key
        deadline = time.monotonic() + PAUSE_LIMIT_SECONDS
        while pause.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    time.sleep(WORK_SECONDS)
    return {"change_id": change.pk, "target": target}


@workflow(
    "durability.steps",
    tools=["durability.effect"],
    input_schema={
        "type": "object",
        "properties": {"tag": {"type": "string", "minLength": 1}},
        "required": ["tag"],
        "additionalProperties": False,
    },
)
def steps(ctx, tag: str) -> dict:
    """Three effects and a check: four recorded steps."""
    first = ctx.tool("durability.effect", target=f"{tag}/a")
    second = ctx.tool("durability.effect", target=f"{tag}/b")
    ctx.check(
        "effects are distinct",
        first["change_id"] != second["change_id"],
        detail=f"{first['change_id']} then {second['change_id']}",
    )
    third = ctx.tool("durability.effect", target=f"{tag}/c")
    return {"changes": [first["change_id"], second["change_id"], third["change_id"]]}


@workflow(
    "durability.sleeps",
    tools=["durability.effect"],
    input_schema={
        "type": "object",
        "properties": {"tag": {"type": "string"}, "seconds": {"type": "number"}},
        "required": ["tag", "seconds"],
        "additionalProperties": False,
    },
)
def sleeps(ctx, tag: str, seconds: float) -> dict:
    """An effect, a durable sleep, then another effect."""
    before = ctx.tool("durability.effect", target=f"{tag}/before")
    ctx.sleep(seconds)
    after = ctx.tool("durability.effect", target=f"{tag}/after")
    return {"changes": [before["change_id"], after["change_id"]]}
