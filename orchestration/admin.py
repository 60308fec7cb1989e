from django.contrib import admin
from django.db import transaction

from orchestration.registry.declare import RISK_FIELDS
from orchestration.registry.models import Agent, Tool
from orchestration.registry.services import agent_record_change
from orchestration.runs.models import Run


@admin.register(Tool)
class ToolAdmin(admin.ModelAdmin):
    """Read-only: risk metadata is edited on the policy pages (``tool_update_risk``), so that each
    edit is ledgered and reaches the gate only through a published policy version."""

    list_display = [
        "name",
        "side_effect",
        "impact",
        "reversible",
        "risk_overridden",
        "present_in_code",
    ]
    list_filter = ["side_effect", "reversible", "risk_overridden"]
    readonly_fields = ["name", "description", "schema", "risk_overridden", "present_in_code"]
    fields = [*readonly_fields[:3], *RISK_FIELDS, *readonly_fields[3:]]

    def has_add_permission(self, request) -> bool:
        return False  # tools are declared in code

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    list_display = ["name", "provider", "model", "autonomy", "status", "owner"]
    list_filter = ["autonomy", "status", "provider"]
    filter_horizontal = ["tools"]

    def save_model(self, request, obj, form, change) -> None:
        with transaction.atomic():
            super().save_model(request, obj, form, change)
            changed = {f: str(form.cleaned_data[f]) for f in form.changed_data if f != "tools"}
            if "tools" in form.changed_data:
                changed["tools"] = sorted(t.name for t in form.cleaned_data["tools"])
            agent_record_change(
                agent=obj,
                by=request.user,
                changed=changed if change else {"created": obj.name, **changed},
            )


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    list_display = ["pk", "workflow", "agent", "status", "created_at"]
    list_filter = ["status", "workflow"]

    def has_change_permission(self, request, obj=None) -> bool:
        return False  # runs change through the engine and the run pages

    def has_add_permission(self, request) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False
