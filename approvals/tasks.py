"""Approval tasks: beat's deadline sweep, and notifications of new high-risk requests."""

from celery import shared_task


@shared_task(ignore_result=True)
def sweep_requests() -> dict[str, int]:
    """Beat, every 5 s: idle claims lapse, and open requests past their deadline get their
    rule's ``on_expiry`` (and a warning shortly before)."""
    from approvals.queue.deadlines import requests_sweep
    from approvals.queue.services import claims_expire

    released = claims_expire()
    return {**requests_sweep(), "claims_released": released}


@shared_task(ignore_result=True)
def notify_request(request_id: int) -> dict[str, int]:
    """After a request's commit: email its team and call the webhooks if its risk is high."""
    from approvals.queue.notifications import request_notify

    return request_notify(request_id)
