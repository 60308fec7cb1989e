import json

import pytest
from django.contrib.auth import get_user_model

from orchestration.ledger.models import AuditRecord
from orchestration.registry.declare import registry_sync
from orchestration.registry.models import Agent, Tool
from orchestration.registry.services import tool_update_risk

pytestmark = pytest.mark.django_db


def test_sync_writes_declared_tools_and_keeps_admin_risk_edits():
    refund = Tool.objects.get(name="payments.refund")  # synced after migrate
    assert (refund.side_effect, refund.impact, refund.reversible) == ("payment", 3, False)

    tool_update_risk(tool=refund, by="policy", impact=4, labels_read=["financial", "pii"])
    Tool.objects.filter(pk=refund.pk).update(description="stale")
    registry_sync()

    refund.refresh_from_db()
    assert refund.impact == 4 and refund.labels_read == ["financial", "pii"]
    assert refund.risk_overridden
    assert refund.description.startswith("Refund money")  # code-owned: follows the code
    record = AuditRecord.objects.get(verb="tool.risk_changed")
    assert json.loads(record.payload)["changes"] == {
        "impact": [3, 4],
        "labels_read": [["financial"], ["financial", "pii"]],
    }


def test_sync_follows_the_code_until_an_admin_overrides():
    Tool.objects.filter(name="email.send").update(impact=0)
    registry_sync()
    assert Tool.objects.get(name="email.send").impact == 2


def test_risk_edits_are_validated():
    tool = Tool.objects.get(name="email.send")
    with pytest.raises(ValueError, match="Not risk metadata: name"):
        tool_update_risk(tool=tool, by="policy", name="x")
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError):
        tool_update_risk(tool=tool, by="policy", impact=9)
    assert Tool.objects.get(name="email.send").impact == 2


def test_admin_edits_go_through_the_services(client):
    admin = get_user_model().objects.create_superuser("root", password="pw-root-123")
    client.force_login(admin)
    tool = Tool.objects.get(name="email.send")
    risk = {
        "side_effect": "external_send",
        "impact": "3",
        "compensating_tool": "",
        "labels_read": "",
        "labels_produced": "",
        "cost_per_call": "0",
    }
    # Django's admin shows tools read-only; risk edits go through the policy pages' service
    assert client.post(f"/admin/orchestration/tool/{tool.pk}/change/", risk).status_code == 403
    response = client.post(f"/policy/tools/{tool.pk}/", risk)
    assert response.status_code == 302, response.content[:3000]
    tool.refresh_from_db()
    assert tool.impact == 3 and tool.risk_overridden
    assert AuditRecord.objects.filter(verb="tool.risk_changed", actor="root").exists()

    agent = Agent.objects.create(name="bot")
    response = client.post(
        f"/admin/orchestration/agent/{agent.pk}/change/",
        {
            "name": "bot",
            "description": "",
            "provider": "scripted",
            "model": "scripted-1",
            "autonomy": "trusted",
            "status": "active",
            "max_steps": "50",
            "max_tokens": "200000",
            "max_cost_usd": "5",
            "max_wall_seconds": "3600",
            "loop_limit": "3",
        },
    )
    assert response.status_code == 302, response.content[:3000]
    record = AuditRecord.objects.get(verb="agent.autonomy_changed")
    assert json.loads(record.payload)["changes"] == {"autonomy": "trusted"}
