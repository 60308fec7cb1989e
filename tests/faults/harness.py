"""The fault suite's machinery: a private Redis it may kill, real worker processes it may
SIGKILL, PostgreSQL backends it may terminate, a reviewer who approves what waits, and the
oracle that classifies every run once the faults are over.

The oracle's four counts, per run:

- **lost**: the run is final but not completed, or completed without an effect its workflow
  made (an approved action among them): work or a decision disappeared;
- **duplicated**: an effect made twice (two rows for one target), or one step's executions
  overlapping in time (the journal of the tool's starts and ends);
- **stuck**: not final within the recovery bound after the last fault;
- **half-written**: records that disagree: a completed run whose steps are not all completed,
  an effect without the completed step that made it (or a step's output naming another row), an
  approved request whose step did not complete, a started run without its ``run.started``
  ledger record or a completed one without ``run.completed``, or a ledger chain that does not
  verify.
"""

import itertools
import os
import subprocess
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis
from django.db import close_old_connections, connection

from config.embedded_redis import server_command
from orchestration.demo.models import InfraChange
from orchestration.ledger.chain import ledger_verify
from orchestration.ledger.models import AuditRecord
from orchestration.runs.models import FINAL, Run, RunStatus, StepStatus
from tests.services import start_process, wait_for

DONE = StepStatus.COMPLETED

# --- a private Redis the suite may kill ------------------------------------------------------


class PrivateRedis:
    """A Redis of the suite's own on a unix socket, without persistence: killed and restarted,
    it comes back empty, every queued message lost (as a Redis without AOF, or a new node)."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.socket = self.dir / "redis.sock"
        self.url = f"unix://{self.socket}"
        self.process: subprocess.Popen | None = None
        self.restarts = 0

    def start(self) -> None:
        self.socket.unlink(missing_ok=True)
        log = self.dir / f"redis-{self.restarts}.log"
        command = server_command(self.socket, self.dir, persist=False)
        self.process = start_process(command, os.environ.copy(), log)
        wait_for(self.pings, timeout=10, what="the private Redis")

    def pings(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)

    def restart_empty(self) -> None:
        """Start it again after ``kill``: empty, every queued message lost."""
        self.restarts += 1
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


# --- PostgreSQL --------------------------------------------------------------------------------


def terminate_backends() -> int:
    """Terminate every other session on the test database, as a failover or a restart of the
    server does to the workers' connections; returns how many."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return cursor.fetchone()[0]


# --- the reviewer ----------------------------------------------------------------------------


class Reviewer(threading.Thread):
    """Approves every open request of the given runs as it appears, through the product's own
    service (the same call the request page makes), until stopped. Survives the faults: a
    decision that meets a dropped connection is tried again."""

    def __init__(self, account, run_ids: Callable[[], list[int]]):
        super().__init__(daemon=True, name="fault-suite-reviewer")
        self.account = account
        self.run_ids = run_ids
        self.approved: list[int] = []
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        from approvals.queue.models import ApprovalRequest
        from approvals.queue.services import approval_decide

        try:
            while not self.halt.is_set():
                try:
                    close_old_connections()
                    pending = list(
                        ApprovalRequest.objects.filter(
                            run_id__in=self.run_ids(), status="pending"
                        ).values_list("pk", flat=True)
                    )
                    for request_id in pending:
                        approval_decide(
                            request=request_id, reviewer=self.account, verdict="approve"
                        )
                        self.approved.append(request_id)
                except Exception as exc:  # a dropped connection: the next round tries again
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    connection.close()
                self.halt.wait(0.1)
        finally:
            connection.close()

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=10)


# --- the oracle --------------------------------------------------------------------------------


@dataclass
class Verdict:
    runs: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    half_written: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"runs={self.runs} lost={len(self.lost)} duplicated={len(self.duplicated)} "
            f"stuck={len(self.stuck)} half_written={len(self.half_written)}"
        )

    @property
    def clean(self) -> bool:
        return not (self.lost or self.duplicated or self.stuck or self.half_written)


def overlapping(journal: Path, deaths: dict[int, float]) -> list[str]:
    """Keys whose executions overlapped in time (one started before another ended). A call
    without an end ran until its process died (``deaths``: pid -> monotonic time)."""
    spans: dict[str, list[list[float]]] = defaultdict(list)
    open_: dict[tuple[str, str], float] = {}
    if journal.exists():
        for line in journal.read_text().splitlines():
            what, key, pid, clock = line.split()
            if what == "start":
                open_[(key, pid)] = float(clock)
            elif (key, pid) in open_:
                spans[key].append([open_.pop((key, pid)), float(clock)])
    for (key, pid), began in open_.items():  # killed mid-call: it ran until its process died
        spans[key].append([began, deaths.get(int(pid), float("inf"))])
    found = []
    for key, intervals in spans.items():
        intervals.sort()
        for earlier, later in itertools.pairwise(intervals):
            if later[0] < earlier[1]:
                found.append(key)
                break
    return found


def classify(
    run_ids: list[int],
    *,
    targets: Callable[[Run], list[str]],
    journal: Path,
    deaths: dict[int, float],
) -> Verdict:
    """Classify each run by the four counts; one run may count in several."""
    from approvals.queue.models import ApprovalRequest

    verdict = Verdict(runs=len(run_ids))
    runs = {run.pk: run for run in Run.objects.filter(pk__in=run_ids)}
    concurrent = set(overlapping(journal, deaths))
    for run_id in run_ids:
        run = runs[run_id]
        name = f"run {run_id} ({run.status})"
        if run.status not in FINAL:
            verdict.stuck.append(name)
            continue
        steps = {step.seq: step for step in run.step_set.all()}
        by_key = {step.idempotency_key: step for step in steps.values()}
        expected = targets(run)
        rows = {t: list(InfraChange.objects.filter(target=t)) for t in expected}
        if run.status != RunStatus.COMPLETED:
            verdict.lost.append(f"{name}: {run.error}")
        elif any(not found for found in rows.values()):
            verdict.lost.append(f"{name}: effects missing {[t for t, r in rows.items() if not r]}")
        for target, found in rows.items():
            if len(found) > 1:
                verdict.duplicated.append(f"{name}: {target} made {len(found)} times")
        for step in steps.values():
            if step.idempotency_key in concurrent:
                lines = [
                    line
                    for line in journal.read_text().splitlines()
                    if f" {step.idempotency_key} " in line
                ]
                verdict.duplicated.append(f"{name}: step {step.seq} ran twice at once: {lines}")
        audit = AuditRecord.objects.filter(run_id=run_id)
        problems = []
        if run.status == RunStatus.COMPLETED:
            problems += [f"step {s.seq} {s.status}" for s in steps.values() if s.status != DONE]
            if not audit.filter(verb="run.completed").exists():
                problems.append("no run.completed record")
        if run.started_at and audit.filter(verb="run.started").count() != 1:
            problems.append(f"{audit.filter(verb='run.started').count()} run.started records")
        for target, found in rows.items():
            for row in found:
                step = by_key.get(row.idempotency_key)
                if step is None or step.status != DONE:
                    problems.append(f"{target}: effect without a completed step")
                elif step.output.get("change_id") != row.pk:
                    problems.append(f"{target}: the step's output names row {step.output}")
        for request in ApprovalRequest.objects.filter(run_id=run_id, status="approved"):
            step = steps.get(request.step_seq)
            if step is None or step.status != DONE:
                problems.append(f"request {request.pk} approved, its step not completed")
        if problems:
            verdict.half_written.append(f"{name}: {problems}")
    if not ledger_verify().ok:
        verdict.half_written.append("the ledger chain does not verify")
    return verdict
