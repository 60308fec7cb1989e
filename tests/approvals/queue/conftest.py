"""Fixtures of the queue's service and transition tests: reviewers, a run, a request."""

import pytest

from approvals.queue.models import ApprovalRequest
from orchestration.canonical import action_hash
from orchestration.registry.models import Agent
from orchestration.runs.models import Run
from tests.approvals.conftest import member as user


@pytest.fixture
def owner():
    return user("owner")


@pytest.fixture
def run(owner):
    agent = Agent.objects.create(name="bot", owner=owner)
    starter = user("starter", "finance")
    return Run.objects.create(
        workflow="customer_refund", workflow_version=1, agent=agent, started_by=starter, budgets={}
    )


def request_for(
    run, *, team="finance", quorum=1, seq=1, tool="payments.refund", args=None
) -> ApprovalRequest:
    args = args or {"order_id": "A-1004", "amount": 1899}
    return ApprovalRequest.objects.create(
        run_id=run.pk,
        step_seq=seq,
        agent="bot",
        tool=tool,
        args=args,
        action_hash=action_hash(tool, args),
        team=team,
        quorum=quorum,
    )
