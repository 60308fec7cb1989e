"""Export of a search's records as CSV or JSON Lines, streamed.

The views are async: they check the user with ``await request.auser()`` and
``await user.ahas_perm()`` (no sync decorator on an async view), parse the filters with the
search's own form, record the export in the ledger in its own transaction, then return a
``StreamingHttpResponse`` over an async generator. The generator reads keyset chunks of
``CHUNK`` records by ``seq`` (oldest first) in a worker thread and yields each chunk's encoded
bytes, so memory stays that of one chunk however many records stream (Daphne and Django's ASGI
handler send each chunk as it comes).

The export covers the matching records older than its own ``audit.exported`` record: a fixed
set, whatever is appended while it streams. CSV cells of text that a spreadsheet would run as a
formula (starting with ``= + - @`` or a tab or carriage return) get a leading ``'``; JSON Lines
carries every value exactly, ``payload`` as the JSON object it is.
"""

import csv
import io
import json
from collections.abc import AsyncIterator
from typing import Any

from asgiref.sync import sync_to_async
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone

from approvals.audit.search import (
    AuditFilters,
    audit_records,
    beyond,
    newest_first,
    parse_filters,
)
from approvals.audit.services import audit_export_record
from approvals.roles import AUDIT

CHUNK = 1000
COLUMNS = (
    "seq",
    "at",
    "actor",
    "actor_user_id",
    "verb",
    "outcome",
    "risk",
    "reason",
    "workflow",
    "tool",
    "run_id",
    "agent_id",
    "approval_id",
    "user_id",
    "object_type",
    "object_id",
    "payload",
    "prev_hash",
    "hash",
)
CONTENT_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/jsonl; charset=utf-8"}
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def export_chunk(filters: AuditFilters, *, after: tuple | None, through: int) -> list[tuple]:
    """Up to ``CHUNK`` matching records older than the export's own record (``through``) and
    after the row ``after`` (the last one sent), oldest first, in the search's order."""
    records = audit_records(filters).filter(seq__lt=through)
    if after is not None:
        seq, at = after
        records = beyond(records, filters, seq, older=False, at=at)
    order = [key.lstrip("-") for key in newest_first(filters)]
    return list(records.order_by(*order).values_list(*COLUMNS)[:CHUNK])


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def encode_csv(rows: list[tuple], *, header: bool = False) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    if header:
        writer.writerow(COLUMNS)
    for row in rows:
        values = list(row)
        values[1] = values[1].isoformat()  # at
        writer.writerow([_cell(v) for v in values])
    return buffer.getvalue().encode()


def encode_jsonl(rows: list[tuple]) -> bytes:
    lines = []
    for row in rows:
        record = dict(zip(COLUMNS, row, strict=True))
        record["at"] = record["at"].isoformat()
        record["payload"] = json.loads(record["payload"])
        lines.append(json.dumps(record, ensure_ascii=False, separators=(",", ":")))
    return ("\n".join(lines) + "\n").encode() if lines else b""


async def stream(filters: AuditFilters, *, through: int, format: str) -> AsyncIterator[bytes]:
    """The export's bytes, one chunk of records at a time."""
    if format == "csv":
        yield encode_csv([], header=True)
    after = None
    while True:
        rows = await sync_to_async(export_chunk)(filters, after=after, through=through)
        if not rows:
            return
        yield encode_csv(rows) if format == "csv" else encode_jsonl(rows)
        after = rows[-1][0], rows[-1][1]  # seq, at


def _invalid(request: HttpRequest, form) -> HttpResponse:
    """The search page with the form's errors, 400 (rendered in a worker thread by Django)."""
    from approvals.audit.views import search_context

    context = search_context(request, None, form)
    return TemplateResponse(request, "approvals/audit/search.html", context, status=400)


async def export(request: HttpRequest, format: str) -> HttpResponse:
    user = await request.auser()
    if not user.is_authenticated:
        return redirect_to_login(request.get_full_path())
    if not await user.ahas_perm(AUDIT):
        raise PermissionDenied("Only auditors and policy admins may export the ledger.")
    filters, form = await sync_to_async(parse_filters)(request.GET)
    if filters is None:
        return await sync_to_async(_invalid)(request, form)
    record = await sync_to_async(audit_export_record)(user=user, format=format, filters=filters)
    response = StreamingHttpResponse(
        stream(filters, through=record.seq, format=format), content_type=CONTENT_TYPES[format]
    )
    stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
    response["Content-Disposition"] = f'attachment; filename="baton-audit-{stamp}.{format}"'
    response["Cache-Control"] = "no-store"
    response["X-Audit-Export-Record"] = str(record.seq)
    return response


async def export_csv(request: HttpRequest) -> HttpResponse:
    return await export(request, "csv")


async def export_jsonl(request: HttpRequest) -> HttpResponse:
    return await export(request, "jsonl")
