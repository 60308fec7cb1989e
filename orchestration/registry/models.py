from decimal import Decimal

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models


class SideEffect(models.TextChoices):
    READ = "read"
    WRITE = "write"
    DELETE = "delete"
    EXTERNAL_SEND = "external_send", "external send"
    PAYMENT = "payment"
    PRIVILEGE = "privilege"
    OTHER = "other"


class Tool(models.Model):
    """A tool's metadata. Code owns the name, description and schema; risk metadata starts from
    the decorator and, once an admin edits it (``risk_overridden``), survives every sync."""

    name = models.CharField(max_length=120, unique=True, help_text="dotted, e.g. payments.refund")
    description = models.TextField(blank=True)
    schema = models.JSONField(default=dict, help_text="JSON Schema of the arguments")
    side_effect = models.CharField(max_length=20, choices=SideEffect.choices)
    impact = models.PositiveSmallIntegerField(
        default=0, validators=[MinValueValidator(0), MaxValueValidator(4)]
    )
    reversible = models.BooleanField(default=True)
    compensating_tool = models.CharField(max_length=120, blank=True)
    labels_read = models.JSONField(default=list, blank=True)
    labels_produced = models.JSONField(default=list, blank=True)
    cost_per_call = models.DecimalField(max_digits=10, decimal_places=6, default=Decimal(0))
    risk_overridden = models.BooleanField(default=False)
    present_in_code = models.BooleanField(default=True)
    allow_similar_forbidden = models.BooleanField(
        default=False, help_text="reviewers may not approve and allow similar actions of this tool"
    )

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Autonomy(models.TextChoices):
    SUPERVISED = "supervised"
    GUARDED = "guarded"
    TRUSTED = "trusted"


class AgentStatus(models.TextChoices):
    ACTIVE = "active"
    PAUSED = "paused"
    SUSPENDED = "suspended"


class Provider(models.TextChoices):
    SCRIPTED = "scripted"
    OPENAI = "openai", "OpenAI-compatible"
    ANTHROPIC = "anthropic"


class Agent(models.Model):
    name = models.CharField(max_length=80, unique=True)
    description = models.TextField(blank=True, help_text="the agent's standing instructions")
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    provider = models.CharField(max_length=20, choices=Provider.choices, default="scripted")
    model = models.CharField(max_length=80, default="scripted-1")
    autonomy = models.CharField(
        max_length=20, choices=Autonomy.choices, default=Autonomy.SUPERVISED
    )
    status = models.CharField(max_length=20, choices=AgentStatus.choices, default="active")
    tools = models.ManyToManyField(Tool, blank=True, help_text="the ceiling: tools it may ever use")
    max_steps = models.PositiveIntegerField(default=50)
    max_tokens = models.PositiveIntegerField(default=200_000)
    max_cost_usd = models.DecimalField(max_digits=10, decimal_places=4, default=Decimal("5"))
    max_wall_seconds = models.PositiveIntegerField(default=3600)
    loop_limit = models.PositiveSmallIntegerField(
        default=3, help_text="the same tool with the same arguments this many times is a loop"
    )
    ask_to_extend_budget = models.BooleanField(
        default=False, help_text="ask a reviewer to extend an exhausted budget instead of failing"
    )

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def budgets(self) -> dict:
        return {
            "max_steps": self.max_steps,
            "max_tokens": self.max_tokens,
            "max_cost_usd": float(self.max_cost_usd),
            "max_wall_seconds": self.max_wall_seconds,
            "loop_limit": self.loop_limit,
            "ask_to_extend": self.ask_to_extend_budget,
        }
