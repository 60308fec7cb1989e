"""The demo's policy, which asks only where the demo's own documents say a person must decide:
refunds above 500 EUR for an order (or a run) in total go to finance (the refund policy); schema
migrations need a second engineer and a volume deletion is confirmed first (the runbook);
customer data goes out only to the customer it is about, card numbers never (the email policy);
secrets never leave (a run that read one sends no email); a booking the customer did not pick
from a shortlist, beyond two weeks, or a second one in a run, is checked (the travel policy).
Everything else within those lines runs on its own. Idempotent."""

from django.db import transaction

from approvals.policy.models import ArgumentFactor, AutonomyThreshold, Grant, PolicyVersion, Rule
from approvals.policy.services import grant_create, policy_publish
from orchestration.registry.models import Agent

INTERNAL = 'args.to.lowerAscii().endsWith("@baton.example")'
# With this refund: the order's refunds (any run, all time) and the run's.
ORDER_TOTAL = "totals.target.sum.amount"
RUN_TOTAL = "totals.run.sum.amount"
# 13 to 19 digits, or groups of four (Amex: 4-6-5) with spaces or dashes between
CARD_NUMBER = (
    r"\b(?:[0-9]{13,19}|[0-9]{4}(?:[ -][0-9]{4}){2}[ -][0-9]{1,7}"
    r"|[0-9]{4}[ -][0-9]{6}[ -][0-9]{5})\b"
)

RULES = [
    dict(
        name="Secrets never leave",
        tool_patterns=["email.*"],
        outcome="deny",
        priority=10,
        condition='"secret" in action.labels || "secret" in run.labels',
        description="Once a run has read a secret it sends no email, inside the company too: "
        "a secret can be re-encoded past any check of what an email carries, so what the run "
        "touched decides, not what the email seems to hold.",
    ),
    dict(
        name="Card numbers never go by email",
        tool_patterns=["email.*"],
        outcome="deny",
        priority=10,
        condition=f'(args.subject + " " + args.body).matches(r"{CARD_NUMBER}")',
        description="The customer email policy: emails never include card numbers.",
    ),
    dict(
        name="Small refunds within policy",
        tool_patterns=["payments.refund"],
        outcome="allow",
        priority=50,
        condition=f"{ORDER_TOTAL} <= 500.0 && {RUN_TOTAL} <= 500.0",
        description="The refund policy: refunds up to 500 EUR for an order in total need no one.",
    ),
    dict(
        name="Large refunds need finance",
        tool_patterns=["payments.refund"],
        outcome="ask",
        priority=20,
        condition=f"{ORDER_TOTAL} > 500.0 || {RUN_TOTAL} > 500.0",
        team="finance",
        deadline_minutes=60,
        message="With this refund the order (or the run) passes 500 EUR refunded: check the "
        "order and the customer's history before approving.",
        allow_similar=True,
        description="The refund policy: refunds above 500 EUR must be approved by a finance "
        "reviewer. Counted over the order's refunds and the run's, so splitting does not evade it.",
    ),
    dict(
        name="Customer data leaving the company",
        tool_patterns=["email.*"],
        outcome="ask",
        priority=30,
        condition=f'"pii" in run.labels && !{INTERNAL} && args.to.lowerAscii() != run.data_subject',
        team="operations",
        deadline_minutes=30,
        allow_similar=True,
        message="The run has read customer data and this email goes outside the company to "
        "someone other than the customer it is about: check the recipient and the content.",
        description="The customer email policy: emails never include other customers' data.",
    ),
    dict(
        name="Customers hear about their own orders",
        tool_patterns=["email.*"],
        outcome="allow",
        priority=60,
        condition='run.data_subject != "" && args.to.lowerAscii() == run.data_subject',
        description="Every piece of customer data the run read is about the recipient.",
    ),
    dict(
        name="Email without anyone's data",
        tool_patterns=["email.*"],
        outcome="allow",
        priority=60,
        condition='!("pii" in run.labels) && !("secret" in run.labels)'
        ' && !("untrusted_input" in action.labels)',
        description="The run has read no customer data and no secret, and the email carries "
        "no retrieved text: nothing the email policy protects can be in it.",
    ),
    dict(
        name="Internal email",
        tool_patterns=["email.*"],
        outcome="allow",
        priority=60,
        condition=INTERNAL,
        description="Email inside the company, from a run that read no secret.",
    ),
    dict(
        name="Schema migrations need a second engineer",
        tool_patterns=["infra.run_migration"],
        outcome="ask",
        priority=20,
        condition="true",
        team="operations",
        deadline_minutes=120,
        on_expiry="escalate",
        escalation_team="finance",
        message="The runbook: schema migrations run in the maintenance window and need a "
        "second engineer's approval. Check the diagnostics first.",
    ),
    dict(
        name="Volume deletions are confirmed first",
        tool_patterns=["infra.delete_volume"],
        outcome="ask",
        priority=20,
        condition="true",
        team="operations",
        deadline_minutes=120,
        on_expiry="deny",
        message="The runbook: deleting a volume is irreversible; confirm it is detached, its "
        "snapshots are verified and backups are older than 90 days.",
    ),
    dict(
        name="Bookings the customer did not pick need a reviewer",
        tool_patterns=["travel.book"],
        outcome="ask",
        priority=40,
        condition="!run.answers.exists(a, a.answer == args.hotel"
        ' && "guest" in a.about && a.about.guest == args.guest)',
        deadline_minutes=60,
        message="The customer did not pick this hotel for this guest from a shortlist (an agent "
        "chose it): check it is what the guest asked for, for them, within their budget.",
        description="The travel policy: book what the customer picked from the shortlist; a "
        "booking the customer did not pick needs a reviewer's approval.",
    ),
    dict(
        name="Long or repeated bookings need a reviewer",
        tool_patterns=["travel.book"],
        outcome="ask",
        priority=40,
        condition="args.nights > 14 || totals.run.count > 1",
        deadline_minutes=60,
        message="A booking of more than two weeks, or a second booking for one request: check "
        "it is what the guest asked for.",
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
    dict(  # the rule asks finance; the points only keep such a refund visible in the queue,
        # below the deny threshold, where an approval may allow similar ones
        name="Refund above 500",
        tool_patterns=["payments.refund"],
        condition=f"{ORDER_TOTAL} > 500.0",
        points=10,
    ),
    dict(
        name="Recipient outside the company",
        tool_patterns=["email.*"],
        condition=f"!{INTERNAL}",
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
