"""Notifications of new high-risk approval requests (``risk_score >= BATON_NOTIFY_RISK``): an
email to the reviewers of the request's team, and a signed JSON POST to each of
``BATON_WEBHOOK_URLS``. Sent after commit by ``approvals.tasks.notify_request``; a failure is
logged, never raised. Every message carries a deep link to the request, which still requires
signing in.

Webhook receivers verify ``X-Baton-Signature: sha256=<hex>``: the HMAC-SHA256, keyed with
``BATON_WEBHOOK_SECRET``, of ``f"{X-Baton-Timestamp}.{body}"``."""

import hashlib
import hmac
import json
import logging
import time
import urllib.request
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import send_mail

from approvals.queue.models import ApprovalRequest
from approvals.roles import REVIEWER

log = logging.getLogger(__name__)

WEBHOOK_TIMEOUT = 5


def request_url(request: ApprovalRequest) -> str:
    return f"{settings.BATON_BASE_URL.rstrip('/')}/approvals/{request.pk}/"


def summary(request: ApprovalRequest) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in sorted(request.args.items()))
    text = f"{request.agent or 'a workflow'} wants to call {request.tool}({args})"
    return text if len(text) <= 300 else text[:297] + "..."


def recipients(request: ApprovalRequest) -> list[str]:
    """The team's members; for a request without a team, every reviewer."""
    users = get_user_model().objects.filter(is_active=True).exclude(email="")
    if request.team:
        users = users.filter(reviewer_teams__name=request.team)
    else:
        users = users.filter(groups__name=REVIEWER)
    return sorted(set(users.values_list("email", flat=True)))


def payload(request: ApprovalRequest) -> dict[str, Any]:
    return {
        "request_id": request.pk,
        "tool": request.tool,
        "summary": summary(request),
        "risk": request.risk_score,
        "team": request.team,
        "deadline": request.deadline.isoformat() if request.deadline else None,
        "url": request_url(request),
    }


def signature(secret: str, timestamp: str, body: str) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256)
    return f"sha256={digest.hexdigest()}"


def request_notify(request_id: int) -> dict[str, int]:
    """Notify about one request if its risk is high; returns what was sent."""
    sent = {"emails": 0, "webhooks": 0}
    request = ApprovalRequest.objects.filter(pk=request_id).first()
    if request is None or request.risk_score < settings.BATON_NOTIFY_RISK:
        return sent
    sent["emails"] = _email(request)
    for url in settings.BATON_WEBHOOK_URLS:
        sent["webhooks"] += _webhook(url, request)
    return sent


def _email(request: ApprovalRequest) -> int:
    to = recipients(request)
    if not to:
        return 0
    subject = f"[Baton] Approval needed: {request.tool} (risk {request.risk_score})"
    deadline = request.deadline.strftime("%Y-%m-%d %H:%M UTC") if request.deadline else "none"
    body = (
        f"{summary(request)}\n\n"
        f"Risk: {request.risk_score}\nTeam: {request.team or 'any reviewer'}\n"
        f"Deadline: {deadline}\n\nReview it (sign-in required): {request_url(request)}\n"
    )
    try:
        send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, to, fail_silently=False)
    except Exception as exc:
        log.warning("could not email request %s to %s: %s", request.pk, to, exc)
        return 0
    return len(to)


def _webhook(url: str, request: ApprovalRequest) -> int:
    secret = settings.BATON_WEBHOOK_SECRET
    if not secret:
        log.warning("webhook %s not called: BATON_WEBHOOK_SECRET is not set", url)
        return 0
    if not url.startswith(("http://", "https://")):
        log.warning("webhook %s not called: only http and https URLs are", url)
        return 0
    body = json.dumps(payload(request), sort_keys=True, separators=(",", ":"))
    timestamp = str(int(time.time()))
    http_request = urllib.request.Request(  # noqa: S310 (http or https, checked above)
        url,
        data=body.encode(),
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "Baton-Webhook/1",
            "X-Baton-Timestamp": timestamp,
            "X-Baton-Signature": signature(secret, timestamp, body),
        },
    )
    try:
        with urllib.request.urlopen(http_request, timeout=WEBHOOK_TIMEOUT) as response:  # noqa: S310
            response.read(1024)
    except Exception as exc:
        log.warning("webhook %s for request %s failed: %s", url, request.pk, exc)
        return 0
    return 1
