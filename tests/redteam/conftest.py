import pytest

from orchestration.providers import PROVIDERS
from tests.redteam.model import COMPROMISED


@pytest.fixture
def policy_gate(settings):
    settings.BATON_GATE = "approvals.policy.gate.PolicyGate"


@pytest.fixture
def compromised_models(monkeypatch):
    """The red team's model providers, looked up by name like the real ones, for this test."""
    for name, provider in COMPROMISED.items():
        monkeypatch.setitem(PROVIDERS, name, provider)
