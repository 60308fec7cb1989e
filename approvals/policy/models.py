"""What admins configure. Rules, argument factors and thresholds are the *draft*; publishing
freezes them, with the tools' risk metadata, into an immutable ``PolicyVersion`` that the gate
evaluates. Grants are audited state, not policy versions."""

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models


class Outcome(models.TextChoices):
    ALLOW = "allow"
    ASK = "ask"
    DENY = "deny"


class RuleMode(models.TextChoices):
    ENFORCE = "enforce"
    SHADOW = "shadow", "shadow (recorded, never decisive)"


class OnExpiry(models.TextChoices):
    DENY = "deny"
    APPROVE = "approve"
    ESCALATE = "escalate"
    HALT = "halt", "halt the run"


class Rule(models.Model):
    name = models.CharField(max_length=120, unique=True)
    description = models.TextField(blank=True)
    enabled = models.BooleanField(default=True)
    mode = models.CharField(max_length=10, choices=RuleMode.choices, default=RuleMode.ENFORCE)
    priority = models.IntegerField(default=100, help_text="lower first")
    agents = models.JSONField(default=list, blank=True, help_text="agent names; empty: all")
    workflows = models.JSONField(default=list, blank=True, help_text="workflow names; empty: all")
    tool_patterns = models.JSONField(default=list, blank=True, help_text='e.g. ["payments.*"]')
    condition = models.TextField(help_text="CEL over action, args, tool, agent, run, risk, now")
    outcome = models.CharField(max_length=10, choices=Outcome.choices)
    # Obligations of an ask
    team = models.CharField(max_length=80, blank=True)
    quorum = models.PositiveSmallIntegerField(
        default=1, validators=[MinValueValidator(1), MaxValueValidator(3)]
    )
    deadline_minutes = models.PositiveIntegerField(default=60)
    on_expiry = models.CharField(max_length=10, choices=OnExpiry.choices, default=OnExpiry.DENY)
    escalation_team = models.CharField(max_length=80, blank=True)
    message = models.TextField(blank=True, help_text="for the reviewer")
    allow_similar = models.BooleanField(
        default=False, help_text="reviewers may approve and allow similar actions"
    )
    last_error = models.TextField(blank=True, help_text="the last evaluation error")
    last_error_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["priority", "name"]

    def __str__(self) -> str:
        return self.name


class ArgumentFactor(models.Model):
    """A risk factor admins define on arguments, e.g. ``args.amount > 500`` adds 30."""

    name = models.CharField(max_length=120, unique=True)
    tool_patterns = models.JSONField(default=list, blank=True)
    condition = models.TextField()
    points = models.IntegerField(validators=[MinValueValidator(-100), MaxValueValidator(100)])
    enabled = models.BooleanField(default=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class AutonomyThreshold(models.Model):
    """Where no rule decides: allow below A, ask from A to D, deny above D, quorum 2 above Q."""

    autonomy = models.CharField(max_length=20, unique=True)
    allow_below = models.PositiveSmallIntegerField(validators=[MaxValueValidator(101)])
    deny_above = models.PositiveSmallIntegerField(validators=[MaxValueValidator(100)])
    quorum2_above = models.PositiveSmallIntegerField(validators=[MaxValueValidator(100)])

    class Meta:
        ordering = ["allow_below"]

    def __str__(self) -> str:
        return self.autonomy


class PolicyVersion(models.Model):
    number = models.PositiveIntegerField(unique=True)
    snapshot = models.JSONField()
    diff = models.TextField(blank=True)
    note = models.TextField(blank=True)
    published_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    published_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-number"]

    def __str__(self) -> str:
        return f"policy v{self.number}"

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise ValueError("A published policy version is immutable.")
        super().save(*args, **kwargs)


class Grant(models.Model):
    """Narrows an agent's ceiling: the agent may use tools matching ``tool_pattern`` (and the
    optional CEL ``condition``) until ``expires_at``. Reviewers' "allow similar" grants are scoped
    to a run or an hour and count their uses."""

    agent = models.ForeignKey(
        "orchestration.Agent", on_delete=models.CASCADE, related_name="grants"
    )
    tool_pattern = models.CharField(max_length=120)
    condition = models.TextField(blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    run_id = models.BigIntegerField(null=True, blank=True, help_text="scoped to one run")
    max_uses = models.PositiveIntegerField(null=True, blank=True)
    uses = models.PositiveIntegerField(default=0)
    source = models.CharField(max_length=20, default="admin")
    request = models.ForeignKey(
        "approvals.ApprovalRequest",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="grants",
        help_text='the request an "allow similar" grant was made on; its team scopes it',
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    revoked_by = models.CharField(max_length=150, blank=True)

    class Meta:
        ordering = ["agent", "tool_pattern"]

    def __str__(self) -> str:
        return f"{self.agent} may use {self.tool_pattern}"


class PolicyEvaluation(models.Model):
    """Every decision with its full evaluation input, so it can be explained and replayed."""

    run_id = models.BigIntegerField(db_index=True)
    step_seq = models.PositiveIntegerField()
    tool = models.CharField(max_length=120, db_index=True)
    agent = models.CharField(max_length=80, blank=True)
    workflow = models.CharField(max_length=120, blank=True)
    action_hash = models.CharField(max_length=64)
    policy_version = models.PositiveIntegerField()
    outcome = models.CharField(max_length=10, choices=Outcome.choices)
    score = models.PositiveSmallIntegerField()
    rules = models.JSONField(default=list)
    shadow_rules = models.JSONField(default=list)
    errors = models.JSONField(default=list)
    input = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.outcome} {self.tool} (run {self.run_id} step {self.step_seq})"
