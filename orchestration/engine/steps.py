"""Recording steps: marked started (attempt, lease) before the side effect, finished after,
fenced by the attempt number. No transaction or lock is held across a model or tool call.

A completed step's finish waits in the run's ``Outbox`` and commits with the next write of the
run (the next step's start, a wait, the end of the run), so a step costs one transaction. A crash
in between loses only the finish: the step is re-executed with the same idempotency key, which is
the window every durable engine has between a side effect and its record.

A step records only values that have a canonical JSON form (no NaN, infinity or NUL): a value
the database would refuse must never wait in the outbox, where it would fail every later write
of the run. ``CanonicalError`` is raised before anything is queued or written."""

import logging
import os
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import close_old_connections, transaction
from django.db.models import F
from django.utils import timezone

from orchestration.canonical import canonical_json
from orchestration.engine.errors import Halted, LeaseLost
from orchestration.engine.timeouts import renewal_thread
from orchestration.runs.models import Event, Run, RunStatus, Step, StepStatus
from orchestration.runs.realtime import broadcast_run

log = logging.getLogger(__name__)


def run_subtree(run_id: int) -> list[int]:
    """The run and its descendants (handoffs' child runs, theirs, ...): one query per level."""
    ids, level = [run_id], [run_id]
    while level:
        level = list(Run.objects.filter(parent_id__in=level).values_list("pk", flat=True))
        ids += level
    return ids


def subtree_labels(run_id: int) -> list[str]:
    """Every label a run and its descendants touched: what a handoff to it returns may carry
    any of them."""
    rows = Step.objects.filter(run_id__in=run_subtree(run_id)).values_list("labels", flat=True)
    return sorted({label for labels in rows for label in labels or []})


def lease_expiry(now):
    return now + timedelta(seconds=settings.BATON_LEASE_SECONDS)


OPEN = [StepStatus.STARTED, StepStatus.WAITING]


@dataclass
class Outbox:
    """Writes of one run that ride on its next transaction."""

    run_id: int
    finishes: list[tuple[Step, dict[str, Any]]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    tokens: int = 0
    cost: Decimal = Decimal(0)
    steps: int = 0

    def counters(self) -> dict[str, Any]:
        return {
            "tokens": F("tokens") + self.tokens,
            "cost_usd": F("cost_usd") + self.cost,
            "steps": F("steps") + self.steps,
        }

    def apply(self, *, run_counters: bool = True) -> None:
        """Write everything waiting, inside the caller's transaction; fenced by attempt. What
        was written leaves the outbox only once that transaction commits: rolled back (a
        dropped connection), it waits for the next write instead of being lost."""
        finishes, events = len(self.finishes), len(self.events)
        tokens, cost, steps = self.tokens, self.cost, self.steps
        for step, fields in self.finishes:
            updated = Step.objects.filter(pk=step.pk, attempt=step.attempt, status__in=OPEN)
            if not updated.update(**fields):
                raise LeaseLost(f"step {step.seq} of run {step.run_id} was taken over")
        if self.events:
            for event in self.events:
                event.pk = None  # a rolled-back insert's id is not reused
            Event.objects.bulk_create(self.events)
        if run_counters and (self.tokens or self.cost or self.steps):
            Run.objects.filter(pk=self.run_id).update(**self.counters())

        def written() -> None:
            del self.finishes[:finishes], self.events[:events]
            self.tokens -= tokens
            self.cost -= cost
            self.steps -= steps

        transaction.on_commit(written)

    def clear(self) -> None:
        self.finishes, self.events = [], []
        self.tokens, self.cost, self.steps = 0, Decimal(0), 0

    def flush(self) -> None:
        if self.finishes or self.events or self.steps:
            with transaction.atomic():
                self.apply()
                transaction.on_commit(lambda: broadcast_run(self.run_id))


def _extend_lease(outbox: Outbox, lease: str, now) -> None:
    """Extend our lease and add the outbox's counters in one update, which also locks the run
    row until this transaction commits: a halt waits for a step start in flight, and no step
    starts once a halt has committed."""
    extended = (
        Run.objects.filter(pk=outbox.run_id, lease_owner=lease)
        .exclude(status=RunStatus.HALTED)
        .update(lease_expires_at=lease_expiry(now), **outbox.counters())
    )
    if not extended:
        run = Run.objects.filter(pk=outbox.run_id).values("status", "halt_reason").first()
        if run and run["status"] == RunStatus.HALTED:
            raise Halted(run["halt_reason"])
        raise LeaseLost(f"run {outbox.run_id} is leased to another worker")


def lease_fence(*, run_id: int, lease: str) -> None:
    """Just before a side effect: the run is still this worker's and not halted (raises
    ``Halted`` or ``LeaseLost``), and the lease is renewed. A halt that committed before the
    fence stops the effect; one that commits after it meets a tool already running."""
    with transaction.atomic():
        _extend_lease(Outbox(run_id), lease, timezone.now())


POLL_SECONDS = 0.05  # how often the waiting thread looks for a renewal's answer


class LeaseKeeper:
    """The heartbeat of a step that is executing. The thread waiting for the step's call
    ``tick``s at least every quarter of the lease: a renewal goes out on the lease thread (so a
    slow or hung query never delays the next check), and a renewal that came back moves the
    deadline on. No other worker can take the run while the lease holds.

    Should no renewal succeed before the lease may expire (the database out of reach), or should
    another worker hold the run (it expired anyway), the step could be executing in two places:
    the process stops itself (``stop_process``), the only way to stop a running call in Python,
    and the run continues elsewhere as after any crash."""

    def __init__(self, run_id: int, lease: str):
        self.run_id, self.lease = run_id, lease
        self.seconds = settings.BATON_LEASE_SECONDS
        self.every = self.seconds / 4
        # Stop this long before the lease may expire: room for clock skew between workers.
        self.margin = self.seconds / 8
        now = time.monotonic()
        # Renewed just before the step began (its start or its fence).
        self.valid_until = now + self.seconds - self.margin
        self._sent_at = now
        self._renewal: Future | None = None
        self._refused = "no answer"
        self._stopped = self._halted = False

    def wait(self) -> float:
        """How long the waiting thread may wait before the next ``tick``: the next renewal, the
        deadline, or (a renewal in flight) a short poll for its answer."""
        if self._halted:
            return self.every
        now = time.monotonic()
        if self._renewal is not None:
            return max(0.0, min(now + POLL_SECONDS, self.valid_until) - now)
        return max(0.0, min(self._sent_at + self.every, self.valid_until) - now)

    def tick(self) -> None:
        if self._halted:
            return  # no lease to keep: nobody else will run this step
        if self._renewal is not None and self._renewal.done():
            self._settle(self._renewal)
            self._renewal = None
        now = time.monotonic()
        if now >= self.valid_until:
            self.stop(f"could not renew the lease of run {self.run_id} ({self._refused})")
            return
        if self._renewal is None and now >= self._sent_at + self.every:
            self._sent_at = now
            self._renewal = renewal_thread().submit(self._renew, now)

    def _renew(self, sent_at: float) -> tuple[float, bool, bool]:
        close_old_connections()  # a connection the server dropped is replaced
        renewed = Run.objects.filter(pk=self.run_id, lease_owner=self.lease).update(
            lease_expires_at=lease_expiry(timezone.now())
        )
        halted = (
            not renewed and Run.objects.filter(pk=self.run_id, status=RunStatus.HALTED).exists()
        )
        return sent_at, bool(renewed), halted

    def _settle(self, renewal: Future) -> None:
        try:
            sent_at, renewed, halted = renewal.result()
        except Exception as exc:  # a database error, an InterfaceError, anything: not renewed
            self._refused = f"{type(exc).__name__}: {exc}"
            return  # the next renewal tries again, on a new connection
        if renewed:
            self.valid_until = sent_at + self.seconds - self.margin
        elif halted:  # a halt ends the lease, and meets the call already running
            self._halted = True
        else:  # the lease lapsed and another worker took the run
            self.stop(f"run {self.run_id} is leased to another worker")

    def stop(self, why: str) -> None:
        if not self._stopped:  # once: the process ends here (unless a test records it)
            self._stopped = True
            stop_process(why)


def stop_process(why: str) -> None:
    log.critical("stopping this worker process: %s while one of its steps executes", why)
    logging.shutdown()
    os._exit(70)


def step_start(
    *,
    outbox: Outbox,
    lease: str,
    seq: int,
    kind: str,
    name: str,
    input: dict,
    attempt: int,
    existing: Step | None = None,
    status: str = StepStatus.STARTED,
    verdict: dict | None = None,
    events: list[tuple[str, str, dict]] = (),
) -> Step:
    """Record that a step (or a new attempt of it) begins, with its events and whatever the
    outbox holds, in one transaction that first extends the run's lease."""
    run_id = outbox.run_id
    canonical_json(input, path=f"step {seq} input")
    now = timezone.now()
    fields = {
        "kind": kind,
        "name": name,
        "input": input,
        "status": status,
        "attempt": attempt,
        "lease": lease,
        "idempotency_key": f"run-{run_id}-step-{seq}",
        "started_at": now,
        "next_attempt_at": None,
        "verdict": verdict,
    }
    try:
        with transaction.atomic():
            _extend_lease(outbox, lease, now)
            outbox.events += [
                Event(run_id=run_id, step_seq=seq, kind=k, message=m, data=d) for k, m, d in events
            ]
            outbox.apply(run_counters=False)  # counters went with the lease
            if existing is None:
                step = Step.objects.create(run_id=run_id, seq=seq, **fields)
            else:
                Step.objects.filter(pk=existing.pk).update(**fields)
                step = existing
                for name_, value in fields.items():
                    setattr(step, name_, value)
            transaction.on_commit(lambda: broadcast_run(run_id))
    except Halted:
        outbox.events = [e for e in outbox.events if e.step_seq != seq]
        outbox.flush()  # what finished before the halt is still recorded
        raise
    return step


def step_finish(
    step: Step,
    *,
    outbox: Outbox,
    status: str,
    output: Any = None,
    error: str = "",
    error_type: str = "",
    tokens: int = 0,
    cost_usd: Decimal | float = 0,
    latency_ms: int = 0,
    labels: list[str] | None = None,
    verdict: dict | None = None,
    next_attempt_at: datetime | None = None,
    message: str = "",
    event_kind: str = "",
    event_data: dict | None = None,
    defer: bool = False,
) -> None:
    """Finish the attempt that ``step`` started: now, or (``defer``) with the run's next write.
    Raises ``LeaseLost`` if another worker started a newer attempt meanwhile (the fence), so a
    stale worker never overwrites it."""
    canonical_json(output, path=f"step {step.seq} output")
    cost = Decimal(str(cost_usd))
    fields: dict[str, Any] = {
        "status": status,
        "output": output,
        "error": error,
        "error_type": error_type,
        "tokens": F("tokens") + tokens,
        "cost_usd": F("cost_usd") + cost,
        "latency_ms": latency_ms,
        "finished_at": timezone.now(),
        "next_attempt_at": next_attempt_at,
    }
    if status in {StepStatus.RETRYING, StepStatus.FAILED}:
        fields["failures"] = F("failures") + 1  # what retries count: not interruptions, not crashes
    if labels is not None:
        fields["labels"] = labels
    if verdict is not None:
        fields["verdict"] = verdict
    outbox.finishes.append((step, fields))
    outbox.tokens += tokens
    outbox.cost += cost
    # Work done counts towards the step budget; extending a budget is not work.
    if status in {StepStatus.COMPLETED, StepStatus.FAILED} and step.kind != "budget":
        outbox.steps += 1
    if message:
        outbox.events.append(
            Event(
                run_id=step.run_id,
                step_seq=step.seq,
                kind=event_kind or f"{step.kind}.{status}",
                message=message,
                data=event_data or {},
            )
        )
    if not defer:
        outbox.flush()
    if "failures" in fields:
        step.failures += 1
    step.status = status
    step.output = output
    step.error = error
    step.error_type = error_type
