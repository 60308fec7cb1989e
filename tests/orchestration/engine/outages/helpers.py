"""Helpers the outage tests share: an administrator's connection beside the engine's, time
passing for a lease, and a run described for a failure's message."""

from datetime import timedelta

import psycopg
from django.db import connection
from django.utils import timezone

from orchestration.runs.models import Run


def admin_connection(dbname: str | None = None) -> psycopg.Connection:
    """A connection of its own to the test database (or ``dbname``), as an operator's session."""
    db = connection.settings_dict
    return psycopg.connect(
        dbname=dbname or db["NAME"],
        user=db["USER"] or None,
        password=db["PASSWORD"] or None,
        host=db["HOST"] or None,
        port=db["PORT"] or None,
        autocommit=True,
    )


def expire_lease(run_id: int) -> None:
    """What time does to the lease of a worker that died."""
    Run.objects.filter(pk=run_id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))


def describe(run_id: int) -> str:
    run = Run.objects.get(pk=run_id)
    rows = [
        (s.seq, s.name, s.status, s.attempt, s.failures, s.error[:80])
        for s in run.step_set.order_by("seq")
    ]
    kinds = list(run.events.order_by("id").values_list("kind", flat=True))
    return f"run {run.status} error={run.error[:200]!r} steps={rows} events={kinds}"
