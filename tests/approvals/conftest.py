"""Fixtures of the control plane's tests: the policy gate with the seeded demo, and reviewers
(``member`` makes one with a role and teams, ``client_for`` logs one in)."""

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.test import Client

from approvals.policy.seed import policy_seed
from approvals.queue.models import ReviewerTeam
from approvals.roles import REVIEWER
from orchestration.demo.seed import demo_data_seed


@pytest.fixture
def policy_gate(settings):
    """The real policy gate over the demo's tools, agents, data and published policy."""
    settings.BATON_GATE = "approvals.policy.gate.PolicyGate"
    demo_data_seed()
    policy_seed()


@pytest.fixture
def reviewer():
    """A reviewer of the finance and operations teams (no role: services check teams)."""
    user = get_user_model().objects.create_user("rae")
    for name in ("finance", "operations"):
        ReviewerTeam.objects.get_or_create(name=name)[0].members.add(user)
    return user


def member(name: str, *teams: str, role: str | None = REVIEWER):
    """An account with ``role`` (a Baton group) in ``teams``."""
    account = get_user_model().objects.create_user(name)
    if role:
        account.groups.add(Group.objects.get(name=role))
    for team in teams:
        ReviewerTeam.objects.get_or_create(name=team)[0].members.add(account)
    return account


def client_for(account) -> Client:
    client = Client()
    client.force_login(account)
    return client
