"""The export: CSV and JSON Lines of exactly the filtered records, streamed by an async view,
recorded in the ledger before the first byte, for auditors and policy admins only; and its
memory stays flat however many records stream through the real ASGI application."""

import csv
import gc
import hashlib
import io
import json
import tracemalloc
from urllib.parse import urlencode

import pytest
from asgiref.sync import sync_to_async
from channels.testing import ApplicationCommunicator
from django.test import AsyncClient

from approvals.audit.export import COLUMNS
from approvals.roles import AUDITOR, POLICY_ADMIN, REVIEWER
from config.asgi import application
from orchestration.ledger.models import AuditRecord
from tests.approvals.audit.conftest import account, append, bulk_records, corpus

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


async def client_as(role: str | None, name: str = "") -> AsyncClient:
    user = await sync_to_async(account)(name or f"user-{role}", role)
    client = AsyncClient()
    await client.aforce_login(user)
    return client


async def body(response) -> bytes:
    return b"".join([chunk async for chunk in response.streaming_content])


def expected(predicate) -> list[AuditRecord]:
    """The records an export should hold: those before its own record that match, oldest
    first (written out here, not with the search's builder)."""
    through = AuditRecord.objects.filter(verb="audit.exported").order_by("-seq").first().seq
    return [r for r in AuditRecord.objects.filter(seq__lt=through).order_by("seq") if predicate(r)]


@pytest.fixture
def records(transactional_db):
    from orchestration.registry.models import Agent

    agents = {name: Agent.objects.create(name=name) for name in ("refund-bot", "mail-bot")}
    rows = corpus(agents)
    rows.append(
        append(
            "policy.deny", actor="policy-gate", tool="payments.refund", risk=95, outcome="deny",
            reason='=HYPERLINK("http://evil.example","click"), "quoted", comma; new\nline ünï',
            payload={"note": "<b>agent text</b>", "amount": 12.5},
        )
    )  # fmt: skip
    return rows


async def test_csv_holds_exactly_the_filtered_records(records):
    client = await client_as(AUDITOR)
    query = urlencode({"tool": "payments.refund", "risk": "high"})
    response = await client.get(f"/audit/export.csv?{query}")

    assert response.status_code == 200
    assert response.streaming and response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"].startswith('attachment; filename="baton-audit-')
    rows = list(csv.reader(io.StringIO((await body(response)).decode())))
    assert rows[0] == list(COLUMNS)
    wanted = await sync_to_async(expected)(
        lambda r: r.tool == "payments.refund" and r.risk is not None and r.risk >= 70
    )
    assert [int(row[0]) for row in rows[1:]] == [r.seq for r in wanted]
    assert len(wanted) == 4
    for row, record in zip(rows[1:], wanted, strict=True):
        values = dict(zip(COLUMNS, row, strict=True))
        assert values["at"] == record.at.isoformat()
        assert values["payload"] == record.payload and values["hash"] == record.hash
        assert values["risk"] == str(record.risk) and values["verb"] == record.verb
        assert values["agent_id"] == ("" if record.agent_id is None else str(record.agent_id))
        if record.reason.startswith("="):  # a spreadsheet must not run it
            assert values["reason"] == "'" + record.reason
        else:
            assert values["reason"] == record.reason


async def test_jsonl_holds_exactly_the_filtered_records_with_every_value(records):
    client = await client_as(POLICY_ADMIN)
    response = await client.get("/audit/export.jsonl?" + urlencode({"q": "finance"}))

    assert response.status_code == 200
    assert response["Content-Type"] == "application/jsonl; charset=utf-8"
    lines = (await body(response)).decode().splitlines()
    exported = [json.loads(line) for line in lines]
    wanted = await sync_to_async(expected)(lambda r: "finance" in r.reason.split())
    assert [e["seq"] for e in exported] == [r.seq for r in wanted] and len(wanted) == 2
    for item, record in zip(exported, wanted, strict=True):
        assert list(item) == list(COLUMNS)
        assert item["payload"] == json.loads(record.payload)
        assert item["reason"] == record.reason and item["risk"] == record.risk
        assert item["at"] == record.at.isoformat() and item["hash"] == record.hash

    everything = await client.get("/audit/export.jsonl")
    exported = [json.loads(line) for line in (await body(everything)).decode().splitlines()]
    hostile = next(e for e in exported if e["verb"] == "policy.deny" and e["risk"] == 95)
    assert hostile["reason"].startswith('=HYPERLINK("http://evil.example"')  # exact in JSON
    assert hostile["payload"] == {"amount": 12.5, "note": "<b>agent text</b>"}


async def test_an_export_is_ledgered_before_it_streams_and_excludes_later_records(records):
    client = await client_as(AUDITOR, "audrey")
    response = await client.get("/audit/export.csv?" + urlencode({"outcome": "ask"}))
    record = await sync_to_async(
        AuditRecord.objects.filter(verb="audit.exported").order_by("-seq").first
    )()
    assert record is not None and response["X-Audit-Export-Record"] == str(record.seq)
    assert (record.actor, record.outcome) == ("audrey", "exported")
    assert json.loads(record.payload) == {"format": "csv", "filters": {"outcome": "ask"}}

    # appended after the export began: not in it (the export is the ledger as of its record)
    await sync_to_async(append)("policy.ask", outcome="ask", reason="after the export")
    rows = list(csv.reader(io.StringIO((await body(response)).decode())))
    assert "after the export" not in {row[COLUMNS.index("reason")] for row in rows}
    assert len(rows) == 1 + 2

    jsonl = await client.get("/audit/export.jsonl?run=8")
    await body(jsonl)
    last = await sync_to_async(AuditRecord.objects.order_by("-seq").first)()
    assert last.verb == "audit.exported" and last.run_id == 8
    assert json.loads(last.payload) == {"format": "jsonl", "filters": {"run": "8"}}


async def test_only_auditors_and_policy_admins_may_export(records):
    count = sync_to_async(AuditRecord.objects.filter(verb="audit.exported").count)
    for role, status in ((REVIEWER, 403), (None, 403), (AUDITOR, 200), (POLICY_ADMIN, 200)):
        client = await client_as(role)
        for path in ("/audit/export.csv", "/audit/export.jsonl"):
            response = await client.get(path)
            assert response.status_code == status, (role, path)
    assert await count() == 4  # refusals are not exports
    response = await AsyncClient().get("/audit/export.csv?tool=x")
    assert response.status_code == 302
    assert response["Location"] == "/login/?next=/audit/export.csv%3Ftool%3Dx"


async def test_invalid_filters_answer_400_and_export_nothing(records):
    client = await client_as(AUDITOR)
    response = await client.get("/audit/export.csv?risk=extreme&from=soon")
    assert response.status_code == 400
    html = response.content.decode()
    assert "These filters are not valid" in html and "Select a valid choice" in html
    exported = AuditRecord.objects.filter(verb="audit.exported").exists
    assert not await sync_to_async(exported)()


# --- memory: the real ASGI application, N and 10 x N records --------------------------------


async def stream_through_asgi(cookie: str, query: str) -> tuple[int, int, str, int]:
    """GET an export through ``config.asgi.application`` as Daphne would call it, reading the
    body as it streams and keeping only its size and digest. Returns (status, bytes, sha256,
    peak traced memory in bytes while streaming)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/audit/export.jsonl",
        "raw_path": b"/audit/export.jsonl",
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), (b"cookie", cookie.encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
    gc.collect()
    tracemalloc.reset_peak()
    communicator = ApplicationCommunicator(application, scope)
    await communicator.send_input({"type": "http.request", "body": b"", "more_body": False})
    start = await communicator.receive_output(timeout=30)
    assert start["type"] == "http.response.start"
    size, digest = 0, hashlib.sha256()
    while True:
        message = await communicator.receive_output(timeout=60)
        chunk = message.pop("body", b"")
        size += len(chunk)
        digest.update(chunk)
        del chunk
        if not message.get("more_body"):
            break
    peak = tracemalloc.get_traced_memory()[1]
    await communicator.wait(timeout=30)
    return start["status"], size, digest.hexdigest(), peak


async def test_memory_stays_flat_while_ten_times_more_records_stream(transactional_db):
    n = 2000  # two chunks of the export; 10 x n is twenty
    small = await sync_to_async(bulk_records)(n, tool="t.small", reason="small batch")
    large = await sync_to_async(bulk_records)(10 * n, tool="t.large", reason="large batch")
    assert small[1] - small[0] + 1 == n and large[1] - large[0] + 1 == 10 * n
    from django.test import Client

    client = Client()
    user = await sync_to_async(account)("audrey", AUDITOR)
    await sync_to_async(client.force_login)(user)
    cookie = f"sessionid={client.cookies['sessionid'].value}"

    tracemalloc.start()
    try:
        await stream_through_asgi(cookie, "tool=t.small")  # warm up: imports, templates, caches
        status_n, size_n, _, peak_n = await stream_through_asgi(cookie, "tool=t.small")
        status_10n, size_10n, _, peak_10n = await stream_through_asgi(cookie, "tool=t.large")
    finally:
        tracemalloc.stop()

    assert status_n == status_10n == 200
    assert size_10n > 9 * size_n > 9 * 500_000  # the body grew tenfold...
    assert peak_10n < 1.5 * peak_n, (peak_n, peak_10n)  # ...the memory did not,
    assert peak_10n < size_10n / 2, (peak_10n, size_10n)  # and it never held the body


def peak_rss_kib(pid: int) -> int:
    """The process's peak resident memory (Linux ``VmHWM``)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


ASGI = "config.asgi:application"


@pytest.fixture
def daphne(transactional_db, redis_url, tmp_path):
    """Daphne in a process of its own, as ``live_server_url`` starts it, with its pid."""
    import sys
    import urllib.request

    from tests.services import free_port, live_env, start_process, stop_process, wait_for

    port = free_port()
    process = start_process(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), ASGI],
        live_env(redis_url),
        tmp_path / "daphne.log",
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.poll() is None, (tmp_path / "daphne.log").read_text()
        try:
            urllib.request.urlopen(url + "/login/", timeout=1).close()  # noqa: S310
            return True
        except OSError:
            return False

    wait_for(up, timeout=20, interval=0.2, what="Daphne")
    yield url, process.pid
    stop_process(process)


@pytest.mark.redis
async def test_daphnes_memory_does_not_grow_with_the_export(daphne):
    """Through Daphne and a client reading as it comes: Daphne's peak RSS after exporting 10 x N
    records is within a few MiB of its peak after N (Daphne applies no back-pressure, so this
    holds for clients that keep reading, as downloads do)."""
    import urllib.request

    url, pid = daphne
    n = 3000
    await sync_to_async(bulk_records)(n, tool="t.small", reason="small batch")
    await sync_to_async(bulk_records)(10 * n, tool="t.large", reason="large batch")
    from django.test import Client

    client = Client()
    await sync_to_async(client.force_login)(await sync_to_async(account)("audrey", AUDITOR))
    cookie = f"sessionid={client.cookies['sessionid'].value}"

    def download(query: str) -> int:
        request = urllib.request.Request(f"{url}/audit/export.jsonl?{query}")  # noqa: S310
        request.add_header("Cookie", cookie)
        size = 0
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
            assert response.status == 200
            while chunk := response.read(64 * 1024):
                size += len(chunk)
        return size

    await sync_to_async(download, thread_sensitive=False)("tool=t.small")  # warm up
    size_n = await sync_to_async(download, thread_sensitive=False)("tool=t.small")
    after_n = peak_rss_kib(pid)
    size_10n = await sync_to_async(download, thread_sensitive=False)("tool=t.large")
    after_10n = peak_rss_kib(pid)

    assert size_10n > 9 * size_n
    grown = (after_10n - after_n) * 1024
    assert grown < size_10n / 3, (after_n, after_10n, size_10n)


async def test_a_time_ranged_export_walks_chunks_by_time_then_seq_through_ties(transactional_db):
    first, last = await sync_to_async(bulk_records)(2500, tool="t.tie")  # one instant, 3 chunks
    client = await client_as(AUDITOR)
    today = (await sync_to_async(AuditRecord.objects.get)(seq=first)).at.date().isoformat()
    response = await client.get(f"/audit/export.jsonl?to={today}&tool=t.tie")
    seqs = [json.loads(line)["seq"] for line in (await body(response)).decode().splitlines()]
    assert seqs == list(range(first, last + 1))
