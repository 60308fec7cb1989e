"""The fault suite's workflow, its tool, and the fault hook of its worker processes.

Imported by the test process and by each worker it starts (``celery worker --include
tests.faults.workflows``): both must know the workflow and the tool.

The tool makes one visible effect per call, an ``InfraChange`` row keyed by the step's
idempotency key, and appends each execution's start and end (key, process, monotonic clock of
the machine) to the journal named by ``BATON_FAULTS_JOURNAL``: the suite reads it to prove that
no step executed twice at the same time.

In a worker, the hook reads the plan named by ``BATON_FAULTS_PLAN``: while that file names a
fault point (``orchestration.engine.faults``), the first worker to reach that point claims the
plan (renames it away, so only one acts) and SIGKILLs itself there."""

import os
import signal
import time
from pathlib import Path

from orchestration.demo.models import InfraChange
from orchestration.engine import faults
from orchestration.registry.declare import tool, workflow

KIND = "faults"
PLAN_ENV = "BATON_FAULTS_PLAN"
JOURNAL_ENV = "BATON_FAULTS_JOURNAL"
LONG_SECONDS = 7.0  # a long step: more than twice the suite's lease of 3 s


def _journal(line: str) -> None:
    path = os.environ.get(JOURNAL_ENV)
    if path:
        with open(path, "a") as journal:  # one short write per line: appends do not interleave
            journal.write(line + "\n")


@tool(
    "faults.effect",
    side_effect="write",
    timeout=LONG_SECONDS + 20,
    schema={
        "type": "object",
        "properties": {
            "target": {"type": "string", "minLength": 1},
            "seconds": {"type": "number", "minimum": 0},
        },
        "required": ["target"],
        "additionalProperties": False,
    },
)
def effect(*, target: str, idempotency_key: str, seconds: float = 0.02) -> dict:
    """Make one idempotent effect (a row), keyed by the step's idempotency key; take
    ``seconds`` about it."""
    _journal(f"start {idempotency_key} {os.getpid()} {time.monotonic():.6f}")
    time.sleep(seconds / 2)
    change, _ = InfraChange.objects.get_or_create(
        idempotency_key=idempotency_key, defaults={"kind": KIND, "target": target}
    )
    time.sleep(seconds / 2)
    _journal(f"end {idempotency_key} {os.getpid()} {time.monotonic():.6f}")
    return {"change_id": change.pk, "target": target}


@workflow(
    "faults.mixed",
    tools=["faults.effect"],
    input_schema={
        "type": "object",
        "properties": {"tag": {"type": "string", "minLength": 1}, "long": {"type": "boolean"}},
        "required": ["tag"],
        "additionalProperties": False,
    },
)
def mixed(ctx, tag: str, long: bool = False) -> dict:
    """An allowed effect, one a reviewer must approve, a durable sleep, and a last effect (a
    long one, longer than the lease, if ``long``)."""
    first = ctx.tool("faults.effect", target=f"{tag}/a")
    approved = ctx.tool("faults.effect", target=f"{tag}/approve")
    ctx.sleep(0.3)
    last = ctx.tool("faults.effect", target=f"{tag}/c", seconds=LONG_SECONDS if long else 0.02)
    return {"changes": [first["change_id"], approved["change_id"], last["change_id"]]}


def _kill_at_planned_point(name: str, run_id: int) -> None:
    plan = os.environ.get(PLAN_ENV)
    if not plan or not Path(plan).exists() or Path(plan).read_text().strip() != name:
        return
    taken = Path(f"{plan}.taken-{os.getpid()}")
    try:
        Path(plan).rename(taken)  # only one worker gets it
    except FileNotFoundError:
        return
    taken.write_text(f"{name} {run_id}")
    os.killpg(os.getpgid(0), signal.SIGKILL)  # the worker and its embedded beat


if os.environ.get(PLAN_ENV):  # a worker of the fault suite
    faults.install(_kill_at_planned_point)
