from decimal import Decimal

from django.conf import settings
from django.db import models


class RunStatus(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"
    HALTED = "halted"


FINAL = {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.HALTED}
RUNNABLE = {RunStatus.PENDING, RunStatus.RUNNING}


class Run(models.Model):
    workflow = models.CharField(max_length=120)
    workflow_version = models.PositiveIntegerField()
    agent = models.ForeignKey(
        "orchestration.Agent", null=True, blank=True, on_delete=models.PROTECT, related_name="runs"
    )
    input = models.JSONField(default=dict)
    intent = models.JSONField(
        default=dict, help_text="goal, constraints, and boundaries: CEL checked on every action"
    )
    status = models.CharField(
        max_length=20, choices=RunStatus.choices, default=RunStatus.PENDING, db_index=True
    )
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    cost_usd = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal(0))
    tokens = models.PositiveIntegerField(default=0)
    steps = models.PositiveIntegerField(default=0)
    progress = models.FloatField(default=0.0)
    progress_label = models.CharField(max_length=200, blank=True)
    budgets = models.JSONField(default=dict)
    allowed_tools = models.JSONField(
        null=True, blank=True, help_text="tools usable in this run; null: the agent's ceiling"
    )
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="children"
    )
    parent_step_seq = models.PositiveIntegerField(null=True, blank=True)
    started_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    halted_by = models.CharField(max_length=150, blank=True)
    halt_reason = models.TextField(blank=True)
    # Durable execution: the lease a worker holds while it advances the run, and the timer
    # (durable sleep, retry backoff) before which the run is not runnable.
    lease_owner = models.CharField(max_length=64, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True, db_index=True)
    wake_at = models.DateTimeField(null=True, blank=True, db_index=True)
    swept_at = models.DateTimeField(
        null=True, blank=True, help_text="when beat's sweep last enqueued it (de-duplication)"
    )

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"run {self.pk} {self.workflow}"

    @property
    def is_final(self) -> bool:
        return self.status in FINAL


class StepKind(models.TextChoices):
    LLM = "llm", "model call"
    TOOL = "tool"
    RETRIEVE = "retrieve", "retrieval"
    CHECK = "check"
    HANDOFF = "handoff"
    ASK_HUMAN = "ask_human", "question"
    NOW = "now"
    UUID = "uuid"
    SLEEP = "sleep"
    BUDGET = "budget", "budget extension"


class StepStatus(models.TextChoices):
    STARTED = "started"
    COMPLETED = "completed"
    FAILED = "failed"
    RETRYING = "retrying"
    WAITING = "waiting"


class Step(models.Model):
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="step_set")
    seq = models.PositiveIntegerField()
    kind = models.CharField(max_length=20, choices=StepKind.choices)
    name = models.CharField(max_length=200)
    input = models.JSONField(default=dict)
    output = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    error_type = models.CharField(max_length=80, blank=True)
    status = models.CharField(max_length=20, choices=StepStatus.choices)
    attempt = models.PositiveIntegerField(default=1)
    # The attempts that failed (recorded as retrying or failed): what the retry policy counts.
    # Attempts a crash or a database outage cut short are not failures of the step.
    failures = models.PositiveIntegerField(default=0)
    lease = models.CharField(max_length=64, blank=True, help_text="the run lease that started it")
    idempotency_key = models.CharField(max_length=80)
    tokens = models.PositiveIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal(0))
    latency_ms = models.PositiveIntegerField(default=0)
    labels = models.JSONField(default=list, blank=True)
    verdict = models.JSONField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["run", "seq"]
        constraints = [models.UniqueConstraint(fields=["run", "seq"], name="step_unique_seq")]
        # the policy's totals of a tool over a window (approvals.policy.aggregates)
        indexes = [models.Index(fields=["name", "started_at"], name="step_name_started_idx")]

    def __str__(self) -> str:
        return f"run {self.run_id} step {self.seq} {self.kind} {self.name}"


class Event(models.Model):
    """The reasoning log: what happened in a run, in order, in words a reviewer can follow."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="events")
    at = models.DateTimeField(auto_now_add=True)
    step_seq = models.PositiveIntegerField(null=True, blank=True)
    kind = models.CharField(max_length=40)
    message = models.TextField()
    data = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"run {self.run_id}: {self.kind}"
