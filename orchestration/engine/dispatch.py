"""Telling a worker to advance a run, after the transaction that made it runnable commits.

The message names the task (``orchestration.tasks.advance_run``) instead of importing it: the
engine sits below the tasks that drive it."""

import logging

from celery import current_app
from django.db import transaction

log = logging.getLogger(__name__)

ADVANCE_RUN = "orchestration.tasks.advance_run"


def enqueue_on_commit(run_id: int) -> None:
    """After commit, tell a worker. A message that cannot be published is not an error: the
    run is committed, and beat's reaper enqueues pending runs whose message was lost."""

    def send() -> None:
        try:
            current_app.send_task(ADVANCE_RUN, args=[run_id])
        except Exception as exc:
            log.warning("could not enqueue run %s (%s); the reaper will start it", run_id, exc)

    transaction.on_commit(send)
