"""The audit search: every filter narrows to exactly the records it names, keyset pages, the htmx
partial, roles, invalid filters (400 with the form's errors) and the last verification."""

import re
from datetime import timedelta
from urllib.parse import urlencode

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from approvals.audit.search import AuditFilters, audit_records, parse_filters
from approvals.roles import AUDITOR, POLICY_ADMIN, REVIEWER
from orchestration.ledger.models import AuditRecord, LedgerVerification
from orchestration.ledger.verification import verify_ledger
from tests.approvals.audit.conftest import HX, account, append, bulk_records, client_for, corpus

pytestmark = pytest.mark.django_db

URL = "/audit/"


def shown(html: str) -> list[int]:
    """The seq of each record row, in page order."""
    return [int(seq) for seq in re.findall(r'<tr id="record-(\d+)"', html)]


def search(client, **params) -> tuple[int, str]:
    response = client.get(URL + "?" + urlencode(params))
    return response.status_code, response.content.decode()


def newest_first(records) -> list[int]:
    return sorted((r.seq for r in records), reverse=True)


# Each filter against the same predicate written out in Python over the corpus.
FILTERS = [
    ({"workflow": "newsletter"}, lambda r: r.workflow == "newsletter"),
    ({"tool": "payments.refund"}, lambda r: r.tool == "payments.refund"),
    ({"actor": "dana"}, lambda r: r.actor == "dana"),
    ({"outcome": "ask"}, lambda r: r.outcome == "ask"),
    ({"outcome": "reject"}, lambda r: r.outcome == "reject"),
    ({"risk": "low"}, lambda r: r.risk is not None and r.risk <= 39),
    ({"risk": "medium"}, lambda r: r.risk is not None and 40 <= r.risk <= 69),
    ({"risk": "high"}, lambda r: r.risk is not None and r.risk >= 70),
    ({"verb": "approval.decided"}, lambda r: r.verb == "approval.decided"),
    ({"verb": "policy"}, lambda r: r.verb.startswith("policy.")),
    ({"verb": "policy.*"}, lambda r: r.verb.startswith("policy.")),
    ({"verb": "run."}, lambda r: r.verb.startswith("run.")),
    ({"run": "8"}, lambda r: r.run_id == 8),
    ({"q": "finance"}, lambda r: "finance" in r.reason.split()),
    ({"q": "customer TWICE"}, lambda r: {"customer", "twice"} <= set(r.reason.lower().split())),
    (
        {"tool": "payments.refund", "risk": "high", "actor": "policy-gate"},
        lambda r: r.tool == "payments.refund" and (r.risk or 0) >= 70 and r.actor == "policy-gate",
    ),
]


@pytest.mark.parametrize(("params", "predicate"), FILTERS, ids=[urlencode(p) for p, _ in FILTERS])
def test_each_filter_narrows_to_exactly_the_matching_records(
    auditor_client, agents, params, predicate
):
    records = corpus(agents)
    expected = newest_first(r for r in records if predicate(r))
    assert expected and len(expected) < len(records)  # the filter narrows, to something

    status, html = search(auditor_client, **params)

    assert status == 200
    assert shown(html) == expected


def test_the_agent_filter_uses_the_agents_records(auditor_client, agents):
    records = corpus(agents)
    mail = agents["mail-bot"].pk
    status, html = search(auditor_client, agent="mail-bot")
    assert status == 200
    assert shown(html) == newest_first(r for r in records if r.agent_id == mail)


def test_the_time_range_includes_both_ends_at_the_precision_given(auditor_client, agents):
    records = corpus(agents)
    first, last = records[3], records[7]
    span = {"from": first.at.isoformat(), "to": last.at.isoformat()}
    status, html = search(auditor_client, **span)
    assert status == 200
    assert shown(html) == newest_first(records[3:8])

    today = timezone.now().date()
    _, html = search(auditor_client, to=today.isoformat())  # a date: the whole day
    assert shown(html) == newest_first(AuditRecord.objects.all())  # the logins' too
    _, html = search(auditor_client, **{"from": (today + timedelta(days=1)).isoformat()})
    assert shown(html) == [] and "No record matches these filters." in html
    minute = last.at.replace(second=0, microsecond=0).strftime("%Y-%m-%dT%H:%M")
    _, html = search(auditor_client, to=minute)  # a minute: all of it
    assert last.seq in shown(html)


@pytest.mark.postgres
def test_postgresql_text_search_takes_web_search_syntax(auditor_client, agents):
    records = corpus(agents)
    by_reason = {r.reason: r.seq for r in records}
    _, html = search(auditor_client, q='"need finance"')
    assert shown(html) == [by_reason["rule Large refunds need finance"]]
    _, html = search(auditor_client, q="finance -rule")
    assert shown(html) == [by_reason["Refund only the blender, not the shipping: finance agreed"]]
    _, html = search(auditor_client, q="blender or mailing")
    assert len(shown(html)) == 3


@pytest.mark.postgres
def test_postgresql_text_search_uses_the_gin_index(agents):
    corpus(agents)
    filters, _ = parse_filters({"q": "finance"})
    query = audit_records(filters).order_by("-seq")[:51]
    # A dozen rows: make the planner show whether the index can serve the expression at all.
    with connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off; SET enable_indexscan = off")
        try:
            plan = query.explain()
        finally:
            cursor.execute("RESET enable_seqscan; RESET enable_indexscan")
    assert "Bitmap Index Scan on audit_reason_tsv_idx" in plan, plan


def test_search_text_is_not_sql_and_an_empty_search_lists_everything(auditor_client, agents):
    records = corpus(agents)
    _, html = search(auditor_client, q="' OR 1=1 --")
    assert shown(html) == []
    _, html = search(auditor_client)
    assert shown(html) == newest_first(AuditRecord.objects.all())
    assert set(shown(html)) > {r.seq for r in records}


def test_keyset_pages_newest_first_with_older_and_newer_cursors(auditor_client):
    records = [append("test.numbered", payload={"n": n}, tool="t.page") for n in range(120)]
    append("test.other", tool="t.other")  # filtered out, between nothing
    seqs = newest_first(records)

    _, html = search(auditor_client, tool="t.page")
    assert shown(html) == seqs[:50]
    assert f"tool=t.page&amp;before={seqs[49]}" in html and "after=" not in html
    _, html = search(auditor_client, tool="t.page", before=seqs[49])
    assert shown(html) == seqs[50:100]
    assert f"before={seqs[99]}" in html and f"after={seqs[50]}" in html
    _, html = search(auditor_client, tool="t.page", before=seqs[99])
    assert shown(html) == seqs[100:]
    assert "before=" not in html.split('id="audit-body"')[1]  # the last page: no older link
    _, html = search(auditor_client, tool="t.page", after=seqs[50])
    assert shown(html) == seqs[:50]


def test_every_page_is_one_keyset_query_without_offset(auditor_client):
    records = [append("test.numbered", payload={"n": n}) for n in range(120)]
    deep = newest_first(records)[99]
    counts = []
    for params in ({}, {"before": deep}):
        with CaptureQueriesContext(connection) as queries:
            search(auditor_client, verb="test.numbered", **params)
        audit = [q["sql"] for q in queries if "orchestration_auditrecord" in q["sql"]]
        assert all("OFFSET" not in sql.upper() for sql in audit), audit
        assert any("LIMIT 51" in sql for sql in audit), audit
        counts.append(len(queries))
    assert counts[0] == counts[1] - 1  # the deep page adds only its "newer" check


def test_htmx_gets_the_results_partial_and_plain_requests_the_page(auditor_client, agents):
    corpus(agents)
    response = auditor_client.get(URL + "?outcome=ask", **HX)
    html = response.content.decode()
    assert response.status_code == 200
    assert html.lstrip().startswith('<section id="audit-results"') and "<html" not in html
    assert "HX-Request" in response["Vary"]
    assert 'id="audit-filters"' not in html  # the form the user is typing in stays as it is
    assert "/audit/export.csv?outcome=ask" in html  # the export buttons follow the filters

    page = auditor_client.get(URL + "?outcome=ask").content.decode()
    assert "<html" in page and 'id="audit-filters"' in page and 'hx-push-url="true"' in page
    restore = auditor_client.get(
        URL + "?outcome=ask", HTTP_HX_REQUEST="true", HTTP_HX_HISTORY_RESTORE_REQUEST="true"
    )
    assert "<html" in restore.content.decode()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"risk": "extreme"}, "Select a valid choice"),
        ({"from": "yesterday"}, "Enter a valid date/time"),
        ({"to": "2026-02-30"}, "Enter a valid date/time"),
        ({"agent": "ghost-bot"}, "No agent is named &#x27;ghost-bot&#x27;"),
        ({"verb": "Approval Decided"}, "An event is dotted lower-case"),
        ({"outcome": "DROP TABLE"}, "An outcome is one lower-case word"),
        ({"run": "seven"}, "Enter a whole number"),
        ({"before": "-3"}, "greater than or equal to 1"),
        ({"from": "2026-03-02", "to": "2026-03-01"}, "&#x27;To&#x27; must be after"),
        ({"q": "x" * 201}, "at most 200 characters"),
    ],
)
def test_invalid_filters_answer_400_with_the_forms_errors(auditor_client, params, message):
    append("test.event", reason="something")
    status, html = search(auditor_client, **params)
    assert status == 400
    assert "These filters are not valid; nothing was searched." in html
    assert message in html
    assert shown(html) == []

    response = auditor_client.get(URL + "?" + urlencode(params), **HX)
    assert response.status_code == 400
    assert response.content.decode().lstrip().startswith('<section id="audit-results"')
    assert message in response.content.decode()


def test_roles_auditors_and_policy_admins_only(agents):
    corpus(agents)
    for role, status in ((AUDITOR, 200), (POLICY_ADMIN, 200), (REVIEWER, 403), (None, 403)):
        client = client_for(account(f"user-{role}", role))
        assert client.get(URL).status_code == status, role
        assert client.get(URL + "?outcome=ask", **HX).status_code == status, role
    response = Client().get(URL + "?outcome=ask")
    assert response.status_code == 302
    assert response["Location"] == "/login/?next=/audit/%3Foutcome%3Dask"


def test_rows_link_to_the_run_replay_the_step_and_the_request(auditor_client, agents):
    gate = append(
        "policy.ask", actor="policy-gate", run_id=41, object_type="step", object_id=5,
        tool="payments.refund", outcome="ask", risk=72,
    )  # fmt: skip
    opened = append("approval.created", actor="policy-gate", run_id=41, approval_id=9)
    _, html = search(auditor_client, run=41)
    row = html.split(f'id="record-{gate.seq}"')[1].split("</tr>")[0]
    assert 'href="/audit/runs/41/#step-5"' in row and "72 · high" in row
    row = html.split(f'id="record-{opened.seq}"')[1].split("</tr>")[0]
    assert 'href="/audit/runs/41/#request-9"' in row
    assert 'href="/approvals/9/"' not in row  # the queue's page is for reviewers


def test_agent_text_in_records_is_escaped(auditor_client):
    append("test.event", reason="<script>alert('r')</script>", payload={"x": "<img src=x>"})
    _, html = search(auditor_client)
    assert "<script>alert" not in html and "<img src=x>" not in html
    assert "&lt;script&gt;alert(&#x27;r&#x27;)&lt;/script&gt;" in html


def test_the_last_verification_is_shown(auditor_client):
    append("test.event")
    assert "Never verified." in search(auditor_client)[1]

    result = verify_ledger(source="command")  # the real check, recorded
    assert result.ok
    html = search(auditor_client)[1]
    assert "chain intact" in html and "by command" in html
    assert f"{result.checked} records checked" in html and result.last_hash[:10] in html
    append("test.event")
    assert "those after" in search(auditor_client)[1]  # newer records are not verified yet

    LedgerVerification.objects.create(
        ok=False, source="command", checked=10, error="#11 was altered: its hash does not match"
    )
    html = search(auditor_client)[1]
    assert "chain BROKEN" in html and "#11 was altered" in html and 'role="alert"' in html


def test_filters_round_trip_to_a_query_string():
    filters, form = parse_filters({"tool": " payments.refund ", "risk": "high", "before": "9"})
    assert form.is_valid() and isinstance(filters, AuditFilters)
    assert filters.querystring() == "tool=payments.refund&risk=high"
    assert filters.tool == "payments.refund" and filters.before == 9


def test_the_page_marks_the_invalid_field(auditor_client):
    _, html = search(auditor_client, risk="extreme", tool="payments.refund")
    assert '<select id="filter-risk" name="risk" aria-invalid="true"' in html
    assert 'id="filter-risk-error"' in html
    assert 'value="payments.refund"' in html  # what the user typed is kept


def test_the_unfiltered_trail_lists_every_record_newest_first_in_keyset_pages(auditor_client):
    """(Moved from tests/approvals/test_shell.py, where the first audit page was tested.)"""
    for n in range(60):
        append("test.numbered", payload={"n": n})
    every = newest_first(AuditRecord.objects.all())  # the auditor's login and role are in it

    _, html = search(auditor_client)
    assert shown(html) == every[:50]
    assert f"?before={every[49]}" in html
    _, html = search(auditor_client, before=11)
    assert shown(html) == list(range(10, 0, -1))
    assert "before=" not in html.split('id="audit-body"')[1]


def test_with_a_time_range_pages_go_by_time_then_seq_even_through_ties(auditor_client):
    """For a range that ends, the order is time, then seq (the ``at`` index serves a range in
    the past); records of the same instant page by seq without loss or repeat."""
    first, last = bulk_records(120, tool="t.tie")  # one instant for all
    seqs = list(range(last, first - 1, -1))
    day = {"to": timezone.now().date().isoformat(), "tool": "t.tie"}

    _, html = search(auditor_client, **day)
    assert shown(html) == seqs[:50]
    _, html = search(auditor_client, **day, before=seqs[49])
    assert shown(html) == seqs[50:100]
    _, html = search(auditor_client, **day, before=seqs[99])
    assert shown(html) == seqs[100:]
    _, html = search(auditor_client, **day, after=seqs[50])
    assert shown(html) == seqs[:50]
    later = append("test.event", tool="t.tie")  # a later instant comes first
    _, html = search(auditor_client, **day)
    assert shown(html) == [later.seq, *seqs[:49]]


def test_a_range_that_ends_lists_by_time_a_range_open_to_now_by_seq(auditor_client):
    first, last = bulk_records(3, at_step=-timedelta(milliseconds=5), tool="t.skew")
    by_seq, by_time = [last, last - 1, first], [first, first + 1, last]
    today = timezone.now().date().isoformat()
    assert shown(search(auditor_client, tool="t.skew", to=today)[1]) == by_time
    assert shown(search(auditor_client, tool="t.skew", **{"from": today})[1]) == by_seq
    assert shown(search(auditor_client, tool="t.skew")[1]) == by_seq
