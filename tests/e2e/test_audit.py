"""An auditor in Chromium: filters the audit trail (htmx swaps the results and pushes the URL),
sees an invalid filter explained, opens a decision page, and exports the filtered records."""

import csv
import io
import os
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from playwright.sync_api import expect

from approvals.queue.models import Decision
from approvals.queue.services import approval_decide
from approvals.roles import AUDITOR
from orchestration.ledger.models import AuditRecord
from tests.approvals.audit.conftest import append
from tests.approvals.queue.test_views import make_request, make_run, member
from tests.e2e.test_smoke import login

pytestmark = [pytest.mark.browser, pytest.mark.redis]


@pytest.fixture
def trail(live_server_url):
    """A decided refund (a real decision with its snapshot) among other records."""
    auditor = get_user_model().objects.create_user("audrey", password="pw-audrey-12345")
    auditor.groups.add(Group.objects.get(name=AUDITOR))
    request = make_request(make_run(), reasoning="The blender arrived broken <b>twice</b>.")
    dana = member("dana", "finance")
    comment = "Refund the blender only after the return arrives"
    approval_decide(
        request=request,
        reviewer=dana,
        verdict="reject",
        comment=comment,
        shown_hash=request.action_hash,
    )
    for n in range(5):
        append("policy.allow", actor="policy-gate", tool="orders.lookup", outcome="allow",
               risk=5 + n, reason=f"risk {5 + n} is below the allow threshold")  # fmt: skip
    append("policy.deny", actor="policy-gate", tool="payments.refund", outcome="deny", risk=93,
           reason="risk 93 is above the deny threshold")  # fmt: skip
    return live_server_url, Decision.objects.get(request=request)


def test_an_auditor_filters_opens_a_decision_and_exports(page, trail):
    base_url, decision = trail
    login(page, base_url, "audrey", "pw-audrey-12345")
    page.wait_for_url(base_url + "/audit/")
    expect(page.locator(".audit-verification")).to_contain_text("Never verified")
    rows = page.locator("#audit-body tr.audit-row")
    assert rows.count() >= 8

    page.get_by_label("Risk band").select_option("high")
    page.wait_for_url("**/audit/?risk=high")
    expect(rows).to_have_count(AuditRecord.objects.filter(risk__gte=70).count())
    page.get_by_label("Reason contains").fill("blender return")
    page.wait_for_url("**/audit/?risk=high&q=blender+return")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("Refund the blender only after the return arrives")

    page.get_by_label("Outcome").fill("Not An Outcome")
    page.get_by_label("Outcome").press("Enter")
    expect(page.locator(".filter-errors")).to_contain_text("An outcome is one lower-case word")
    page.get_by_label("Outcome").fill("reject")
    page.get_by_label("Outcome").press("Enter")
    page.wait_for_url("**/audit/?outcome=reject&risk=high&q=blender+return")
    expect(rows).to_have_count(1)
    if os.environ.get("BATON_SCREENSHOTS"):
        page.screenshot(
            path=str(Path(os.environ["BATON_SCREENSHOTS"]) / "audit.png"), full_page=True
        )

    rows.first.get_by_role("link", name=f"Decision {decision.pk}").click()
    page.wait_for_url(f"{base_url}/audit/decisions/{decision.pk}/")
    expect(page.locator(".decision-head")).to_contain_text("snapshot verified")
    expect(page.locator(".snapshot")).to_contain_text("The blender arrived broken <b>twice</b>.")
    if os.environ.get("BATON_SCREENSHOTS"):
        path = Path(os.environ["BATON_SCREENSHOTS"]) / "audit-decision.png"
        page.screenshot(path=str(path), full_page=True)

    page.go_back()
    page.wait_for_url("**/audit/?outcome=reject&risk=high&q=blender+return")
    with page.expect_download() as download:
        page.get_by_role("link", name="CSV", exact=True).click()
    text = Path(download.value.path()).read_text()
    exported = list(csv.DictReader(io.StringIO(text)))
    assert [row["reason"] for row in exported] == [
        "Refund the blender only after the return arrives"
    ]
    assert exported[0]["verb"] == "approval.decided" and exported[0]["actor"] == "dana"
    record = AuditRecord.objects.filter(verb="audit.exported").get()
    assert record.actor == "audrey"
    assert '"filters":{"outcome":"reject","q":"blender return","risk":"high"}' in record.payload
