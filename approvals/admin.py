"""Django's admin shows policy, grants, evaluations and approvals read-only: every change goes
through the policy pages and the queue, whose services version it and write the ledger."""

from django.contrib import admin

from approvals.policy.models import (
    ArgumentFactor,
    AutonomyThreshold,
    Grant,
    PolicyEvaluation,
    PolicyVersion,
    Rule,
)
from approvals.queue.models import ApprovalRequest, Decision


class ReadOnlyAdmin(admin.ModelAdmin):
    """Viewable by superusers; no add, change or delete (a POST to a change page is a 403)."""

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Rule)
class RuleAdmin(ReadOnlyAdmin):
    list_display = ["name", "priority", "outcome", "mode", "enabled", "tool_patterns", "updated_at"]
    list_filter = ["outcome", "mode", "enabled"]
    search_fields = ["name", "condition"]


@admin.register(ArgumentFactor)
class ArgumentFactorAdmin(ReadOnlyAdmin):
    list_display = ["name", "points", "tool_patterns", "enabled"]


@admin.register(AutonomyThreshold)
class AutonomyThresholdAdmin(ReadOnlyAdmin):
    list_display = ["autonomy", "allow_below", "quorum2_above", "deny_above"]


@admin.register(PolicyVersion)
class PolicyVersionAdmin(ReadOnlyAdmin):
    list_display = ["number", "published_by", "published_at", "note"]


@admin.register(Grant)
class GrantAdmin(ReadOnlyAdmin):
    list_display = [
        "agent",
        "tool_pattern",
        "condition",
        "expires_at",
        "run_id",
        "uses",
        "max_uses",
        "source",
        "revoked_at",
    ]
    list_filter = ["source", "agent"]


@admin.register(PolicyEvaluation)
class PolicyEvaluationAdmin(ReadOnlyAdmin):
    list_display = ["id", "created_at", "tool", "agent", "outcome", "score", "policy_version"]
    list_filter = ["outcome", "tool", "agent"]
    search_fields = ["action_hash"]


@admin.register(ApprovalRequest)
class ApprovalRequestAdmin(ReadOnlyAdmin):
    list_display = ["id", "kind", "tool", "agent", "status", "team", "deadline", "created_at"]
    list_filter = ["status", "kind", "team"]


@admin.register(Decision)
class DecisionAdmin(ReadOnlyAdmin):
    list_display = ["id", "request", "reviewer", "verdict", "created_at"]
    list_filter = ["verdict"]
