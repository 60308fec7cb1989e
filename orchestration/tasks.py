from datetime import timedelta

from celery import shared_task
from celery.signals import task_prerun, worker_ready
from django.db import close_old_connections, transaction
from django.db.models import Q
from django.utils import timezone

from orchestration.broadcast import broadcast_system_status
from orchestration.workers import heartbeat_record

# A pending run nobody has touched for this long lost its enqueue message.
LOST_ENQUEUE_SECONDS = 5
SWEEP_AGAIN = timedelta(seconds=10)


@task_prerun.connect
def _fresh_connections(**kwargs) -> None:
    """Before every task, replace a database connection the server dropped (a restart, a
    failover) or that outlived ``CONN_MAX_AGE``. Celery's own check is skipped while
    ``CELERY_DB_REUSE_MAX`` reuses connections, so a dead one would fail task after task."""
    close_old_connections()


@shared_task(ignore_result=True)
def advance_run(run_id: int) -> str:
    """Advance one run for one time slice; does nothing if another worker holds it."""
    from orchestration.engine.runner import run_advance

    return run_advance(run_id)


@shared_task(ignore_result=True)
def sweep_runs() -> int:
    """Beat's timer sweep: wake runs whose timer is due, and reap runs whose lease expired
    (a SIGKILLed worker) or whose enqueue message was lost. Costs at most one slice. A run it
    enqueued is not enqueued again for ``SWEEP_AGAIN``, so sweeps queued behind a
    backlog do not multiply it."""
    from orchestration.engine.runner import CLAIMABLE
    from orchestration.runs.models import Run, RunStatus

    now = timezone.now()
    lease_free = Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lt=now)
    not_just_swept = Q(swept_at__isnull=True) | Q(swept_at__lt=now - SWEEP_AGAIN)
    due = (
        # A lease that expired unreleased: its worker died, whatever the run's status says.
        Q(status__in=CLAIMABLE, lease_expires_at__lt=now)
        | Q(status=RunStatus.WAITING, wake_at__lte=now)
        | Q(status=RunStatus.RUNNING, wake_at__isnull=True)
        | Q(status=RunStatus.RUNNING, wake_at__lte=now)
        | Q(status=RunStatus.PENDING, created_at__lt=now - timedelta(seconds=LOST_ENQUEUE_SECONDS))
    )
    candidates = Run.objects.filter(lease_free & due & not_just_swept)
    run_ids = list(candidates.values_list("pk", flat=True)[:500])
    # Marked only if still due: a run a worker claimed meanwhile keeps no stale mark, which
    # would keep its next timer from the sweep for SWEEP_AGAIN.
    candidates.filter(pk__in=run_ids).update(swept_at=now)
    for run_id in run_ids:
        advance_run.delay(run_id)
    return len(run_ids)


@shared_task(bind=True, ignore_result=True)
def worker_heartbeat(self) -> None:
    """Scheduled by beat: the worker that runs it is alive and consuming the queue."""
    with transaction.atomic():
        heartbeat_record(hostname=self.request.hostname or "worker")
        transaction.on_commit(broadcast_system_status)


@worker_ready.connect
def _heartbeat_on_start(sender, **kwargs) -> None:
    with transaction.atomic():
        heartbeat_record(hostname=sender.hostname)
        transaction.on_commit(broadcast_system_status)


# The first run after an upgrade walks the whole chain, and a day's pruning verifies a day of
# records: both may take longer than the default task time limit.
@shared_task(ignore_result=True, time_limit=3600, soft_time_limit=3500)
def ledger_checkpoint() -> bool:
    """Scheduled by beat: verify the ledger's records since the last signed checkpoint, record
    the run, and checkpoint the head if it advanced."""
    from orchestration.ledger.verification import verify_and_checkpoint

    return verify_and_checkpoint().ok


@shared_task(ignore_result=True, time_limit=3600, soft_time_limit=3500)
def ledger_prune() -> int:
    """Scheduled by beat, daily: delete the records past ``BATON_AUDIT_RETENTION_DAYS``."""
    from orchestration.ledger.retention import ledger_prune as prune

    return prune().deleted
