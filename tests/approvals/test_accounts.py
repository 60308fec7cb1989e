import json

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management import call_command

from approvals.roles import AUDITOR, POLICY_ADMIN, REVIEWER, ROLE_PERMISSIONS
from orchestration.ledger.chain import ledger_verify
from orchestration.ledger.models import AuditRecord

pytestmark = pytest.mark.django_db


def records(verb):
    return [
        json.loads(r.payload) | {"_actor": r.actor} for r in AuditRecord.objects.filter(verb=verb)
    ]


def test_roles_exist_with_their_permissions():
    for name, codenames in ROLE_PERMISSIONS.items():
        group = Group.objects.get(name=name)
        assert sorted(group.permissions.values_list("codename", flat=True)) == sorted(codenames)


def test_roles_come_back_after_their_tables_are_emptied():
    Group.objects.all().delete()
    call_command("migrate", verbosity=0)  # emits post_migrate, as a flush does
    assert set(Group.objects.values_list("name", flat=True)) == {REVIEWER, POLICY_ADMIN, AUDITOR}
    call_command("migrate", verbosity=0)  # and again: idempotent
    assert Group.objects.count() == 3


def test_login_logout_and_failed_login_are_recorded(client):
    get_user_model().objects.create_user("rita", password="pw-rita-123")
    assert client.post("/login/", {"username": "rita", "password": "wrong"}).status_code == 200
    good = {"username": "rita", "password": "pw-rita-123"}
    assert client.post("/login/", good).status_code == 302
    assert client.post("/logout/").status_code == 302

    assert [r["username"] for r in records("account.login_failed")] == ["rita"]
    assert [r["_actor"] for r in records("account.login")] == ["rita"]
    assert [r["_actor"] for r in records("account.logout")] == ["rita"]
    assert "wrong" not in "".join(AuditRecord.objects.values_list("payload", flat=True))
    assert ledger_verify().ok


def test_role_changes_are_recorded_from_either_side():
    user = get_user_model().objects.create_user("sam")
    reviewer, auditor = Group.objects.get(name=REVIEWER), Group.objects.get(name=AUDITOR)

    user.groups.add(reviewer)
    auditor.user_set.add(user)
    user.groups.remove(reviewer)
    user.groups.clear()

    granted = [(r["user"], r["role"]) for r in records("account.role_granted")]
    revoked = [(r["user"], r["role"]) for r in records("account.role_revoked")]
    assert granted == [("sam", REVIEWER), ("sam", AUDITOR)]
    assert revoked == [("sam", REVIEWER), ("sam", AUDITOR)]


def test_superuser_and_staff_changes_are_recorded():
    user = get_user_model().objects.create_user("kim")
    user.is_superuser = True
    user.save()
    user.first_name = "Kim"
    user.save()  # no flag changed: no record
    changes = records("account.flags_changed")
    assert changes == [{"user": "kim", "is_superuser": True, "_actor": "system"}]


def test_role_changes_made_in_the_admin_name_the_admin(client):
    admin = get_user_model().objects.create_superuser("root", password="pw-root-123")
    target = get_user_model().objects.create_user("lee")
    client.force_login(admin)
    reviewer = Group.objects.get(name=REVIEWER)
    response = client.post(
        f"/admin/auth/user/{target.pk}/change/",
        {
            "username": "lee",
            "groups": [reviewer.pk],
            "is_active": "on",
            "date_joined_0": "2026-01-01",
            "date_joined_1": "00:00:00",
            "initial-date_joined_0": "2026-01-01",
            "initial-date_joined_1": "00:00:00",
        },
    )
    assert response.status_code == 302, response.content[:2000]
    assert records("account.role_granted") == [{"user": "lee", "role": REVIEWER, "_actor": "root"}]


def test_demo_seed_is_idempotent_and_keeps_passwords(client):
    first = call_seed()
    count = AuditRecord.objects.count()
    second = call_seed()
    assert first == second
    assert AuditRecord.objects.count() == count  # nothing changed, nothing recorded
    roles = {login.username: login.role for login in first}
    assert roles == {
        "reviewer": REVIEWER,
        "dana": REVIEWER,
        "omar": REVIEWER,
        "policy": POLICY_ADMIN,
        "auditor": AUDITOR,
        "admin": "Superuser",
    }
    for login in first:
        assert client.login(username=login.username, password=login.password)


def call_seed():
    from approvals.demo import demo_seed

    return demo_seed()
