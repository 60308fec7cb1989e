"""Worker liveness: each Celery worker records a heartbeat, and the app shell warns when none is
recent (otherwise runs look stuck with no explanation)."""

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone


class WorkerHeartbeat(models.Model):
    hostname = models.CharField(max_length=255, unique=True)
    seen_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.hostname} at {self.seen_at:%H:%M:%S}"


@dataclass(frozen=True)
class WorkerStatus:
    alive: bool
    last_seen: datetime | None
    stale_at: datetime | None  # when the newest heartbeat stops counting


def heartbeat_record(*, hostname: str) -> None:
    WorkerHeartbeat.objects.update_or_create(
        hostname=hostname, defaults={"seen_at": timezone.now()}
    )


def worker_status() -> WorkerStatus:
    last_seen = (
        WorkerHeartbeat.objects.order_by("-seen_at").values_list("seen_at", flat=True).first()
    )
    if last_seen is None:
        return WorkerStatus(alive=False, last_seen=None, stale_at=None)
    stale_at = last_seen + timedelta(seconds=settings.BATON_WORKER_STALE_AFTER)
    return WorkerStatus(alive=timezone.now() < stale_at, last_seen=last_seen, stale_at=stale_at)
