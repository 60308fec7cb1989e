"""Errors raised into workflow code, and the control signals that unwind it.

Control signals derive from ``BaseException`` so that an ``except Exception:`` in a workflow
cannot swallow a suspend, a halt, an exhausted budget or a replay mismatch."""

import sqlite3

from django.db import InterfaceError, OperationalError

INFRASTRUCTURE_ERRORS = (OperationalError, InterfaceError)
# PostgreSQL's SQLSTATEs of a server that could not answer, not of a refused query: connection
# exceptions, a server out of disk, memory or connections, sessions ended by a shutdown, a
# restart or an idle timeout, and the conflicts with other sessions (serialization failure,
# deadlock, a lock not granted in time) that trying again resolves.
OUTAGE_SQLSTATES = (
    "08",
    "53100",
    "53200",
    "53300",
    "57P01",
    "57P02",
    "57P03",
    "57P05",
    "25P03",
    "40001",
    "40P01",
    "55P03",
)


def is_outage(error: BaseException) -> bool:
    """Whether ``error`` says the database could not answer (a dropped connection, a restart, a
    failover, a lock held by another writer), as opposed to refusing this query (a statement
    timeout, a missing table, bad SQL), which is the step's own failure. Nothing about a run is
    decided by an outage: the run is advanced again once the database answers."""
    if isinstance(error, InterfaceError):
        return True
    if not isinstance(error, OperationalError):
        return False
    cause = error.__cause__
    if isinstance(cause, sqlite3.OperationalError):
        return "locked" in str(cause) or "busy" in str(cause)
    sqlstate = getattr(cause, "sqlstate", None)
    return sqlstate is None or sqlstate.startswith(OUTAGE_SQLSTATES)  # None: no server answer


class ControlSignal(BaseException):
    """Unwinds the workflow; the runner decides what happens to the run."""


class Suspend(ControlSignal):
    """The run waits (for a reviewer, a child run, a timer, a retry) and frees its worker."""

    def __init__(self, reason: str, *, wake_at=None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.wake_at = wake_at  # a timer (sleep, retry backoff); None: woken by an event


class SliceEnded(ControlSignal):
    """The time slice is over; the run is re-enqueued and continues where it stopped."""


class Halted(ControlSignal):
    """The run was halted; no further step starts."""


class LeaseLost(ControlSignal):
    """Another worker holds the run now; this one stops without writing."""


class Interrupted(ControlSignal):
    """The engine's database failed under a step (its own queries, or a tool's on the same
    server): the step is neither failed nor retried as a failure; the run is left for a worker
    to advance again, which re-executes the step with the same idempotency key."""


class WorkflowMisuse(ControlSignal):
    """Workflow code used the engine in a way it cannot keep its promises under (a ``ctx`` call
    inside a transaction the workflow opened): the run fails, saying why."""


class BudgetExceeded(ControlSignal):
    """A budget (steps, tokens, cost, wall time) or the loop limit is exhausted."""


class NonDeterminismError(ControlSignal):
    """Replay no longer matches the recorded steps: the workflow code changed under a run."""


class WorkflowError(Exception):
    """Base of the errors a workflow may catch and handle."""


class ActionDenied(WorkflowError):
    """The gate denied the action; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ActionRejected(WorkflowError):
    """A reviewer rejected the action; ``reason`` is their feedback."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CheckFailed(WorkflowError):
    pass


class StepFailed(WorkflowError):
    """A step failed for good (retries exhausted or a non-retryable error)."""

    def __init__(self, message: str, *, error_type: str = "") -> None:
        super().__init__(message)
        self.error_type = error_type


class InvalidArguments(WorkflowError):
    """Tool arguments that do not match the tool's JSON Schema or have no canonical form."""


class ToolUnavailable(InvalidArguments):
    """A tool outside what may be used here: the run's limit or, inside ``ctx.agent``, the
    tools that loop offered its model (an unknown name from a model included)."""


class NonRetryable(Exception):
    """Raise from a tool for an error that a retry cannot fix."""


# Errors re-raised on replay from a recorded failed step, by name.
REPLAYABLE = {
    cls.__name__: cls
    for cls in (
        ActionDenied,
        ActionRejected,
        CheckFailed,
        StepFailed,
        InvalidArguments,
        ToolUnavailable,
    )
}
