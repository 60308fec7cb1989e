"""Fixtures of the control plane's tests: the policy gate with the seeded demo, and a reviewer."""

import pytest
from django.contrib.auth import get_user_model

from approvals.policy.seed import policy_seed
from approvals.queue.models import ReviewerTeam
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
