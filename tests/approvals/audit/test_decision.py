"""The decision page: exactly what the reviewer saw, rendered from the decision's snapshot, with
its hash recomputed; a snapshot changed after the fact is shown as a loud mismatch."""

import pytest
from django.test import Client

from approvals.queue.models import Decision
from approvals.roles import POLICY_ADMIN, REVIEWER
from orchestration.canonical import canonical_json, sha256_hex
from orchestration.ledger.models import AuditRecord
from tests.approvals.audit.conftest import account, client_for
from tests.approvals.queue.test_views import make_request, make_run, member

pytestmark = pytest.mark.django_db

HOSTILE = "<script>alert('pwned')</script> & <b>refund now</b>"


def decided(verdict="approve", **post):
    """A request decided through the reviewer's real page (the view takes the snapshot)."""
    run = make_run()
    request = make_request(run, reasoning=HOSTILE, args={"order_id": "A-1004", "amount": 1899})
    reviewer = member("dana", "finance")
    response = client_for(reviewer).post(
        f"/approvals/{request.pk}/decide/",
        {"verdict": verdict, "action_hash": request.action_hash, **post},
    )
    assert response.status_code in (200, 302), response.content.decode()[:500]
    return Decision.objects.get(request=request, reviewer=reviewer)


def page(client, decision) -> str:
    response = client.get(f"/audit/decisions/{decision.pk}/")
    assert response.status_code == 200
    return response.content.decode()


def test_the_page_shows_what_the_reviewer_saw_and_the_decision(auditor_client):
    decision = decided("reject", comment="The order was never paid.")
    html = page(auditor_client, decision)

    assert "✓ snapshot verified" in html and "MISMATCH" not in html
    hashes = html.split('<table class="kv hashes">')[1].split("</table>")[0]
    assert hashes.count(sha256_hex(canonical_json(decision.snapshot))) == 3  # stored, now, ledger
    assert "payments.refund: order_id A-1004, amount 1899" in html
    assert '<th scope="row">amount</th><td>1899</td>' in html
    assert "Large refunds need finance" in html and "v3" in html and "irreversible" in html
    assert "0.82" in html  # the stated confidence
    assert "The order was never paid." in html and "by dana" in html
    record = AuditRecord.objects.get(verb="approval.decided", approval_id=decision.request_id)
    assert f'id="record-{record.seq}" class="audit-row band-high own-record"' in html
    assert f"/audit/runs/{decision.request.run_id}/#request-{decision.request_id}" in html


def test_agent_text_is_escaped(auditor_client):
    html = page(auditor_client, decided())
    assert "<script>alert" not in html and "<b>refund now</b>" not in html
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt; &amp; &lt;b&gt;refund now" in html


def test_an_edit_shows_the_arguments_diff(auditor_client):
    decision = decided("edit", **{"arg-order_id": "A-1004", "arg-amount": "80", "confirm": "1"})
    assert decision.diff == {"amount": [1899, 80]}
    html = page(auditor_client, decision)
    assert '<td class="diff-remove">1899</td><td class="diff-add">80</td>' in html
    assert "✓ snapshot verified" in html


def test_a_tampered_snapshot_is_a_loud_mismatch(auditor_client):
    decision = decided()
    forged = {**decision.snapshot, "args": {"order_id": "A-1004", "amount": 18}}
    Decision.objects.filter(pk=decision.pk).update(snapshot=forged)

    html = page(auditor_client, decision)

    assert "✗ snapshot hash MISMATCH" in html and "✓ snapshot verified" not in html
    assert 'class="banner banner-error snapshot-mismatch" role="alert"' in html
    assert "does not hash to the hash stored with the decision" in html
    assert '<th scope="row">amount</th><td>18</td>' in html  # shown, and flagged


def test_a_snapshot_rewritten_with_its_hash_is_caught_by_the_ledger(auditor_client):
    decision = decided()
    forged = {**decision.snapshot, "reasoning": "Refund approved by the CFO."}
    Decision.objects.filter(pk=decision.pk).update(
        snapshot=forged, snapshot_hash=sha256_hex(canonical_json(forged))
    )
    html = page(auditor_client, decision)
    assert "✗ snapshot hash MISMATCH" in html
    assert "does not hash to the hash the ledger recorded" in html
    assert "does not hash to the hash stored with the decision" not in html


def test_only_auditors_and_policy_admins_see_decisions(auditor_client):
    decision = decided()
    url = f"/audit/decisions/{decision.pk}/"
    assert client_for(account("pat", POLICY_ADMIN)).get(url).status_code == 200
    assert client_for(account("rev", REVIEWER)).get(url).status_code == 403
    assert client_for(account("nobody")).get(url).status_code == 403
    assert Client().get(url)["Location"] == f"/login/?next={url}"
    assert auditor_client.get("/audit/decisions/999999/").status_code == 404
