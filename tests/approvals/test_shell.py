from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.utils import timezone

from approvals.roles import AUDITOR, POLICY_ADMIN, REVIEWER
from orchestration.workers import WorkerHeartbeat

pytestmark = pytest.mark.django_db

NO_WORKER = "No worker is running"


def user_with(role: str | None, **flags):
    user = get_user_model().objects.create_user(f"user-{role or 'none'}", **flags)
    if role:
        user.groups.add(Group.objects.get(name=role))
    return user


@pytest.mark.parametrize(
    ("role", "landing"),
    [(REVIEWER, "/approvals/"), (POLICY_ADMIN, "/policy/rules/"), (AUDITOR, "/audit/")],
)
def test_home_sends_each_role_where_it_works(client, role, landing):
    client.force_login(user_with(role))
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"] == landing
    assert client.get(landing).status_code == 200


def test_superuser_lands_in_djangos_admin(client):
    client.force_login(user_with(None, is_staff=True, is_superuser=True))
    assert client.get("/")["Location"] == "/admin/"


def test_a_user_without_a_role_is_told_so(client):
    client.force_login(user_with(None))
    response = client.get("/")
    assert response.status_code == 403
    assert b"No role yet" in response.content


def test_anonymous_users_are_sent_to_login():
    from django.test import Client

    for url in ["/", "/approvals/", "/policy/rules/", "/roles/", "/audit/"]:
        response = Client().get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/login/")


@pytest.mark.parametrize(
    ("role", "allowed"),
    [
        (REVIEWER, {"/approvals/"}),
        (POLICY_ADMIN, {"/policy/rules/", "/roles/", "/audit/"}),
        (AUDITOR, {"/audit/"}),
    ],
)
def test_pages_and_navigation_follow_the_role(client, role, allowed):
    client.force_login(user_with(role))
    pages = {"/approvals/", "/policy/rules/", "/roles/", "/audit/", "/admin/"}
    for url in pages - {"/admin/"}:
        assert client.get(url).status_code == (200 if url in allowed else 403), url
    html = client.get(sorted(allowed)[0]).content.decode()
    for url in pages:
        assert (f'href="{url}"' in html) == (url in allowed), url


def test_worker_banner_shows_until_a_heartbeat_is_recent(client, settings):
    client.force_login(user_with(REVIEWER))
    assert NO_WORKER in client.get("/approvals/").content.decode()

    beat = WorkerHeartbeat.objects.create(hostname="w1", seen_at=timezone.now())
    assert NO_WORKER not in client.get("/approvals/").content.decode()

    beat.seen_at = timezone.now() - timedelta(seconds=settings.BATON_WORKER_STALE_AFTER + 1)
    beat.save()
    html = client.get("/approvals/").content.decode()
    assert NO_WORKER in html
    assert "last Celery worker heartbeat was" in html


def test_login_page_renders_errors_and_logout_needs_post(client):
    get_user_model().objects.create_user("ann", password="pw-ann-1234")
    response = client.post("/login/", {"username": "ann", "password": "nope"})
    assert b"didn't match" in response.content
    client.login(username="ann", password="pw-ann-1234")
    assert client.get("/logout/").status_code == 405
