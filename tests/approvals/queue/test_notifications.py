"""Notifications of new high-risk requests: email to the team, signed webhooks, a deep link,
and failures that are logged, not raised."""

import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from django.contrib.auth import get_user_model
from django.core import mail
from django.utils import timezone

from approvals.queue.models import ApprovalRequest, ReviewerTeam
from approvals.queue.notifications import request_notify
from approvals.tasks import notify_request

pytestmark = pytest.mark.django_db

SECRET = "webhook-test-secret"


@pytest.fixture
def notify_settings(settings):
    settings.BATON_NOTIFY_RISK = 60
    settings.BATON_BASE_URL = "https://baton.example"
    settings.BATON_WEBHOOK_URLS = []
    settings.BATON_WEBHOOK_SECRET = SECRET
    settings.DEFAULT_FROM_EMAIL = "baton@baton.example"
    return settings


@pytest.fixture
def finance():
    team = ReviewerTeam.objects.create(name="finance")
    for name in ("fin1", "fin2"):
        team.members.add(get_user_model().objects.create_user(name, email=f"{name}@baton.example"))
    get_user_model().objects.create_user("other", email="other@baton.example")
    return team


def request_with(risk: int) -> ApprovalRequest:
    return ApprovalRequest.objects.create(
        run_id=1,
        step_seq=1,
        agent="refund-bot",
        tool="payments.refund",
        args={"order_id": "A-1004", "amount": 1899},
        team="finance",
        risk_score=risk,
        deadline=timezone.now(),
    )


class Receiver:
    """A local stand-in for a webhook endpoint."""

    def __init__(self, status: int = 200) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((dict(self.headers), body.decode()))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    stand_in = Receiver()
    yield stand_in
    stand_in.close()


def test_a_low_risk_request_notifies_nobody(notify_settings, finance, receiver):
    notify_settings.BATON_WEBHOOK_URLS = [receiver.url]
    assert request_notify(request_with(59).pk) == {"emails": 0, "webhooks": 0}
    assert mail.outbox == [] and receiver.received == []


def test_a_high_risk_request_emails_its_team_with_a_deep_link(notify_settings, finance):
    request = request_with(60)
    assert notify_request(request.pk) == {"emails": 2, "webhooks": 0}
    (message,) = mail.outbox
    assert sorted(message.to) == ["fin1@baton.example", "fin2@baton.example"]
    assert message.from_email == "baton@baton.example"
    assert "payments.refund" in message.subject
    assert f"https://baton.example/approvals/{request.pk}/" in message.body


def test_the_webhook_is_signed_over_timestamp_and_body(notify_settings, finance, receiver):
    notify_settings.BATON_WEBHOOK_URLS = [receiver.url]
    request = request_with(80)
    assert request_notify(request.pk)["webhooks"] == 1
    ((headers, body),) = receiver.received
    timestamp = headers["X-Baton-Timestamp"]
    expected = hmac.new(SECRET.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256)
    assert hmac.compare_digest(headers["X-Baton-Signature"], f"sha256={expected.hexdigest()}")
    data = json.loads(body)
    assert data["request_id"] == request.pk and data["tool"] == "payments.refund"
    assert (data["risk"], data["team"]) == (80, "finance")
    assert data["url"] == f"https://baton.example/approvals/{request.pk}/"
    assert data["deadline"] == request.deadline.isoformat()
    assert "amount=1899" in data["summary"]
    # a tampered body does not verify
    forged = hmac.new(SECRET.encode(), f"{timestamp}.{body} ".encode(), hashlib.sha256)
    assert headers["X-Baton-Signature"] != f"sha256={forged.hexdigest()}"


def test_a_failing_webhook_is_logged_not_raised(notify_settings, finance, receiver, caplog):
    broken = Receiver(status=500)
    closed = HTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    dead_url = f"http://127.0.0.1:{closed.server_port}/hook"
    closed.server_close()  # nothing listens there any more
    notify_settings.BATON_WEBHOOK_URLS = [dead_url, broken.url, receiver.url]
    try:
        sent = request_notify(request_with(90).pk)
    finally:
        broken.close()
    assert sent == {"emails": 2, "webhooks": 1}  # the working one still got it
    assert len(receiver.received) == 1
    assert caplog.text.count("failed") >= 2


def test_a_failing_mail_server_is_logged_not_raised(notify_settings, finance, caplog):
    notify_settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    notify_settings.EMAIL_HOST, notify_settings.EMAIL_PORT = "127.0.0.1", 1
    assert request_notify(request_with(90).pk)["emails"] == 0
    assert "could not email" in caplog.text


def test_opening_a_high_risk_request_enqueues_its_notification_after_commit(
    settings, monkeypatch, django_capture_on_commit_callbacks
):
    from approvals.policy.decide import Decision
    from approvals.policy.gate import request_open
    from orchestration.gate import Action
    from orchestration.runs.models import Run

    settings.BATON_NOTIFY_RISK = 60
    queued = []
    monkeypatch.setattr(notify_request, "delay", queued.append)
    run = Run.objects.create(workflow="customer_refund", workflow_version=1, budgets={})

    def open_with(score: int, seq: int) -> ApprovalRequest:
        action = Action(tool="payments.refund", args={"amount": 1}, run_id=run.pk, step_seq=seq)
        decision = Decision("ask", "test", "h", {"amount": 1}, score=score, obligations={})
        return request_open(action=action, run=run, decision=decision)

    with django_capture_on_commit_callbacks(execute=True):
        high = open_with(75, 1)
        open_with(10, 2)
    assert queued == [high.pk]
