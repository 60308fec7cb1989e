"""The demo's policy: large refunds, customer data leaving the company and production changes
go to reviewers; secrets never leave; routine reads run on their own. Idempotent."""

from django.db import transaction

from approvals.policy.models import ArgumentFactor, AutonomyThreshold, Grant, PolicyVersion, Rule
from approvals.policy.services import grant_create, policy_publish
from orchestration.registry.models import Agent

RULES = [
    dict(
        name="Secrets never leave",
        tool_patterns=["email.*"],
        outcome="deny",
        priority=10,
        condition='"secret" in action.labels',
        description="Arguments carrying text from a step labelled secret cannot be sent out.",
    ),
    dict(
        name="Small refunds within policy",
        tool_patterns=["payments.refund"],
        outcome="allow",
        priority=50,
        condition="args.amount <= 100.0",
        description="Refunds up to 100 EUR follow the refund policy on their own.",
    ),
    dict(
        name="Large refunds need finance",
        tool_patterns=["payments.refund"],
        outcome="ask",
        priority=20,
        condition="args.amount > 500.0",
        team="finance",
        deadline_minutes=60,
        message="Check the order and the customer's history before approving.",
        allow_similar=True,
    ),
    dict(
        name="Customer data leaving the company",
        tool_patterns=["email.send"],
        outcome="ask",
        priority=30,
        condition='"pii" in action.labels && !args.to.endsWith("@baton.example")',
        team="operations",
        deadline_minutes=30,
        allow_similar=True,
        message="The email carries customer data; check the recipient and the content.",
    ),
    dict(
        name="Production changes need two engineers",
        tool_patterns=["infra.run_migration", "infra.delete_volume"],
        outcome="ask",
        priority=20,
        condition="true",
        team="operations",
        quorum=2,
        deadline_minutes=120,
        on_expiry="escalate",
        escalation_team="finance",
        message="Irreversible production change: check the diagnostics first.",
    ),
    dict(
        name="Watch expensive bookings",
        tool_patterns=["travel.book"],
        outcome="ask",
        priority=90,
        mode="shadow",
        condition="args.nights > 5",
        description="Shadow: how often would long bookings need a reviewer?",
    ),
]
FACTORS = [
    dict(
        name="Refund above 500",
        tool_patterns=["payments.*"],
        condition="args.amount > 500.0",
        points=30,
    ),
    dict(
        name="Recipient outside the company",
        tool_patterns=["email.*"],
        condition='!args.to.endsWith("@baton.example")',
        points=20,
    ),
]
THRESHOLDS = {
    "supervised": (35, 90, 70),
    "guarded": (50, 95, 80),
    "trusted": (65, 98, 90),
}
GRANTS = {
    "refund-bot": ["orders.lookup", "payments.refund", "email.send"],
    "travel-agent": ["travel.*"],
    "infra-agent": ["infra.*"],
}


def policy_seed(*, by="demo-seed") -> PolicyVersion | None:
    """Create the draft and publish it as version 1, and grant the demo agents their tools."""
    with transaction.atomic():
        for name, patterns in GRANTS.items():
            agent = Agent.objects.filter(name=name).first()
            if agent is None or Grant.objects.filter(agent=agent).exists():
                continue
            for pattern in patterns:
                grant_create(agent=agent, tool_pattern=pattern, by=by)
        if PolicyVersion.objects.exists():
            return None
        for rule in RULES:
            Rule.objects.get_or_create(name=rule["name"], defaults=rule)
        for factor in FACTORS:
            ArgumentFactor.objects.get_or_create(name=factor["name"], defaults=factor)
        for autonomy, (allow_below, deny_above, quorum2_above) in THRESHOLDS.items():
            AutonomyThreshold.objects.get_or_create(
                autonomy=autonomy,
                defaults={
                    "allow_below": allow_below,
                    "deny_above": deny_above,
                    "quorum2_above": quorum2_above,
                },
            )
        return policy_publish(by=by, note="The demo policy.")
