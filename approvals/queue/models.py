"""Approval requests: actions the gate asked a human about, and questions from ``ask_human``.
Their statuses change only through ``approvals.queue.transitions``."""

from django.conf import settings
from django.db import models


class RequestKind(models.TextChoices):
    ACTION = "action"
    QUESTION = "question"


class RequestStatus(models.TextChoices):
    PENDING = "pending"
    APPROVED = "approved"
    EDITED = "edited", "approved with edits"
    REJECTED = "rejected"
    EXPIRED = "expired"
    ESCALATED = "escalated"
    HALTED = "halted"
    SUPERSEDED = "superseded"


OPEN = [RequestStatus.PENDING, RequestStatus.ESCALATED]
GRANTED = [RequestStatus.APPROVED, RequestStatus.EDITED]
APPROVALS = ["approve", "edit"]  # the decisions that approve the hash they carry


class ReviewerTeam(models.Model):
    """Reviewers see and decide only their teams' requests (a request without a team is for
    every reviewer)."""

    name = models.CharField(max_length=80, unique=True)
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, related_name="reviewer_teams")

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ApprovalRequest(models.Model):
    kind = models.CharField(max_length=10, choices=RequestKind.choices, default="action")
    run_id = models.BigIntegerField(db_index=True)
    step_seq = models.PositiveIntegerField()
    agent = models.CharField(max_length=80, blank=True)
    tool = models.CharField(max_length=120, blank=True)
    args = models.JSONField(default=dict)
    action_hash = models.CharField(max_length=64, blank=True)
    reasoning = models.TextField(blank=True)
    confidence = models.FloatField(null=True, blank=True)
    question = models.TextField(blank=True)
    choices = models.JSONField(default=list, blank=True)
    verdict = models.JSONField(default=dict, help_text="the gate's verdict that asked")
    obligations = models.JSONField(default=dict)
    status = models.CharField(
        max_length=12, choices=RequestStatus.choices, default="pending", db_index=True
    )
    team = models.CharField(max_length=80, blank=True)
    quorum = models.PositiveSmallIntegerField(default=1)
    deadline = models.DateTimeField(null=True, blank=True, db_index=True)
    risk_score = models.PositiveSmallIntegerField(default=0)
    # ``action_hash`` is the hash under review: of ``args`` as proposed or, after a reviewer's
    # edit, of ``approved_args`` (the edit, which executes once approved; null: no edit).
    # ``approved_hash`` is the hash the approval was given for.
    approved_args = models.JSONField(null=True, blank=True)
    approved_hash = models.CharField(max_length=64, blank=True)
    edited_by = models.CharField(max_length=150, blank=True, help_text="who made the edit")
    supersedes = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="superseded_by",
        help_text="the request this one replaces (the action or its obligations changed)",
    )
    answer = models.TextField(blank=True)
    reason = models.TextField(blank=True, help_text="rejection or halt reason")
    decided_by = models.CharField(max_length=150, blank=True)
    decided_at = models.DateTimeField(null=True, blank=True)
    claimed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    claimed_at = models.DateTimeField(null=True, blank=True)
    claim_expires_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["deadline", "-risk_score", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["run_id", "step_seq"],
                condition=models.Q(status__in=["pending", "escalated"]),
                name="one_open_request_per_step",
            )
        ]

    def __str__(self) -> str:
        what = self.tool or "question"
        return f"request {self.pk}: {what} (run {self.run_id})"

    @property
    def args_under_review(self) -> dict:
        """What an approval now approves: the reviewer's edit, else the proposed arguments."""
        return self.approved_args if self.approved_args is not None else self.args

    def ledger_refs(self) -> dict:
        """The columns a ledger record about this request is searched by; the agent is the one
        that acted (a nested agent, not necessarily the run's)."""
        from orchestration.registry.models import Agent
        from orchestration.runs.models import Run

        run = Run.objects.filter(pk=self.run_id).values("workflow", "agent_id").first() or {}
        acting = Agent.objects.filter(name=self.agent).values_list("pk", flat=True).first()
        return {
            "run_id": self.run_id,
            "approval_id": self.pk,
            "agent_id": acting if acting is not None else run.get("agent_id"),
            "workflow": run.get("workflow", ""),
            "tool": self.tool,
            "risk": self.risk_score if self.kind == RequestKind.ACTION else None,
        }


class Decision(models.Model):
    """One per reviewer per request; immutable. An approval counts toward the quorum of the
    team it was given under (an escalated request's new team counts its own)."""

    request = models.ForeignKey(ApprovalRequest, on_delete=models.PROTECT, related_name="decisions")
    reviewer = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT)
    verdict = models.CharField(max_length=12)  # approve, edit, reject, halt, answer
    action_hash = models.CharField(max_length=64, blank=True)
    team = models.CharField(
        max_length=80, blank=True, help_text="the request's team when the decision was given"
    )
    edited_args = models.JSONField(null=True, blank=True)
    diff = models.JSONField(null=True, blank=True)
    comment = models.TextField(blank=True)
    snapshot = models.JSONField(default=dict, help_text="exactly what the reviewer was shown")
    snapshot_hash = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(
                fields=["request", "reviewer"], name="one_decision_per_reviewer"
            )
        ]

    def __str__(self) -> str:
        return f"{self.verdict} by {self.reviewer_id} on {self.request_id}"

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise ValueError("A decision is immutable.")
        super().save(*args, **kwargs)
