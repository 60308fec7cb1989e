"""Demo data for the embedded mode: one user per role and a superuser. Idempotent.

Passwords are generated on first seed, never committed, and kept in ``var/demo-logins.json``
(git-ignored) so that every ``make run`` can print them again."""

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import transaction

from approvals.policy.seed import policy_seed
from approvals.queue.models import ReviewerTeam
from approvals.roles import AUDITOR, POLICY_ADMIN, REVIEWER
from orchestration.demo.seed import demo_data_seed, demo_runs_seed
from orchestration.ledger.actor import acting_as

DEMO_USERS = [
    # username, role (None: superuser)
    ("reviewer", REVIEWER),
    ("dana", REVIEWER),
    ("omar", REVIEWER),
    ("policy", POLICY_ADMIN),
    ("auditor", AUDITOR),
    ("admin", None),
]

# Two teams, so that team scoping, quorum and separation of duties can be shown: agents are owned
# by the admin, who is no reviewer.
DEMO_TEAMS = {"finance": ["reviewer", "dana"], "operations": ["reviewer", "omar"]}


@dataclass(frozen=True)
class DemoLogin:
    username: str
    role: str
    password: str | None  # None: the user existed before and keeps its password


def logins_file() -> Path:
    return Path(settings.VAR_DIR) / "demo-logins.json"


def demo_seed() -> list[DemoLogin]:
    path = logins_file()
    known = json.loads(path.read_text()) if path.exists() else {}
    User = get_user_model()
    logins = []
    with acting_as("demo-seed"), transaction.atomic():
        for username, role in DEMO_USERS:
            user = User.objects.filter(username=username).first()
            if user is None:
                password = secrets.token_urlsafe(9)
                user = User.objects.create_user(
                    username=username,
                    password=password,
                    email=f"{username}@example.com",
                    is_staff=role is None,
                    is_superuser=role is None,
                )
                known[username] = password
            if role and not user.groups.filter(name=role).exists():
                user.groups.add(Group.objects.get(name=role))
            logins.append(DemoLogin(username, role or "Superuser", known.get(username)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(known, indent=2))
    path.chmod(0o600)
    admin = User.objects.get(username="admin")
    for team, members in DEMO_TEAMS.items():
        reviewer_team, _ = ReviewerTeam.objects.get_or_create(name=team)
        reviewer_team.members.add(*User.objects.filter(username__in=members))
    with acting_as("demo-seed"):
        demo_data_seed(owner=admin)
        policy_seed()
        demo_runs_seed(started_by=admin)
    return logins
