"""The auditors' search: one filter form, shared by the search page, its htmx partial and both
exports, and one queryset builder.

Pages are keyset pages by ``seq`` (newest first): ``before`` (older) and ``after`` (newer)
cursors, so every page costs the same however deep it is. Text in reasons is PostgreSQL full-text
search on ``to_tsvector('simple'::regconfig, reason)``, the expression of the GIN index of
migration ``orchestration.0009_audit_reason_search`` (web-search syntax: words, "a phrase",
``or``, ``-word``); SQLite has no such index and matches each word with ``icontains``.
"""

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django import forms
from django.contrib.postgres.search import SearchQuery, SearchVectorField
from django.db import connections
from django.db.models import Func, Q, QuerySet
from django.utils.http import urlencode

from approvals.queue.selectors import BANDS, band_range
from orchestration.ledger.models import AuditRecord
from orchestration.registry.models import Agent

PAGE_SIZE = 50
TEXT_CONFIG = "simple"  # the text search configuration of the index (no stemming, no stop words)

# A verb ("approval.decided") or a family of verbs: "approval", "approval." or "approval.*".
VERB_FILTER = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*(\.\*?)?$")
OUTCOME_FILTER = re.compile(r"^[a-z][a-z0-9_]*$")

# Offered in the form's suggestions; any lower-case word is accepted (the ledger's writers add
# outcomes of their own: opened, claimed, expired, escalated...).
KNOWN_OUTCOMES = [
    "allow",
    "ask",
    "deny",
    "approve",
    "edit",
    "reject",
    "halt",
    "answer",
    "opened",
    "expired",
    "escalated",
    "superseded",
    "started",
    "completed",
    "failed",
    "halted",
]
KNOWN_VERBS = [
    "policy",
    "policy.allow",
    "policy.ask",
    "policy.deny",
    "approval",
    "approval.created",
    "approval.decided",
    "approval.answered",
    "approval.expired",
    "approval.escalated",
    "approval.halted",
    "run",
    "run.created",
    "run.started",
    "run.completed",
    "run.failed",
    "run.halted",
    "grant",
    "account",
    "audit",
    "audit.exported",
]

FILTER_KEYS = (
    "from",
    "to",
    "agent",
    "workflow",
    "tool",
    "actor",
    "outcome",
    "risk",
    "verb",
    "q",
    "run",
)
CURSOR_KEYS = ("before", "after")


class ReasonVector(Func):
    """``to_tsvector('simple'::regconfig, reason)``, written exactly as the GIN index is, so that
    PostgreSQL uses the index."""

    template = f"to_tsvector('{TEXT_CONFIG}'::regconfig, %(expressions)s)"
    output_field = SearchVectorField()


def _precision(raw: str) -> timedelta:
    """How much a "to" value covers: a whole day for a date, a minute for a time without
    seconds, a second (or microsecond) otherwise, so that "to" includes what it names."""
    raw = raw.strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", raw):
        return timedelta(days=1)
    if re.search(r"[T ]\d{1,2}:\d{2}$", raw):
        return timedelta(minutes=1)
    if re.search(r"[T ]\d{1,2}:\d{2}:\d{2}$", raw):
        return timedelta(seconds=1)
    return timedelta(microseconds=1)


class AuditFilterForm(forms.Form):
    """The search's query string. Invalid values are form errors (the page answers 400 with
    them), never exceptions. ``from`` and ``to`` are Python keywords, so they are added in
    ``__init__``."""

    agent = forms.CharField(required=False, max_length=80)
    workflow = forms.CharField(required=False, max_length=120)
    tool = forms.CharField(required=False, max_length=120)
    actor = forms.CharField(required=False, max_length=150, label="Reviewer or actor")
    outcome = forms.RegexField(
        regex=OUTCOME_FILTER,
        required=False,
        max_length=20,
        error_messages={"invalid": "An outcome is one lower-case word, e.g. deny or reject."},
    )
    risk = forms.ChoiceField(
        required=False,
        label="Risk band",
        choices=[("", "any"), *((name, f"{name} ({low}-{high})") for name, low, high in BANDS)],
    )
    verb = forms.RegexField(
        regex=VERB_FILTER,
        required=False,
        max_length=100,
        label="Event",
        error_messages={
            "invalid": "An event is dotted lower-case (approval.decided), or a family "
            "(approval or approval.*)."
        },
    )
    q = forms.CharField(required=False, max_length=200, label="Reason contains")
    run = forms.IntegerField(required=False, min_value=1, label="Run")
    before = forms.IntegerField(required=False, min_value=1, widget=forms.HiddenInput)
    after = forms.IntegerField(required=False, min_value=1, widget=forms.HiddenInput)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        when = {"type": "datetime-local", "step": "1"}
        self.fields = {
            "from": forms.DateTimeField(
                required=False, label="From (UTC)", widget=forms.DateTimeInput(attrs=when)
            ),
            "to": forms.DateTimeField(
                required=False,
                label="To (UTC)",
                help_text="included: a date covers the whole day",
                widget=forms.DateTimeInput(attrs=when),
            ),
            **self.fields,
        }

    def clean_agent(self) -> str:
        name = self.cleaned_data["agent"].strip()
        if name and not Agent.objects.filter(name=name).exists():
            raise forms.ValidationError(f"No agent is named {name!r}.")
        return name

    def clean_q(self) -> str:
        text = " ".join(self.cleaned_data["q"].split())
        if "\x00" in text:
            raise forms.ValidationError("The text contains a NUL character.")
        return text

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        start, end = data.get("from"), data.get("to")
        if end is not None:
            data["to"] = end + _precision(self.data.get("to", ""))
        if start is not None and end is not None and start >= data["to"]:
            self.add_error("to", "'To' must be after 'from'.")
        if data.get("before") and data.get("after"):
            self.add_error(None, "Page either before or after a record, not both.")
        for key in ("workflow", "tool", "actor"):
            if key in data:
                data[key] = data[key].strip()
        return data


@dataclass(frozen=True)
class AuditFilters:
    """Valid filters. ``end`` is exclusive; ``raw`` keeps the values as given (for links, the
    export's query string and its ledger record)."""

    start: datetime | None = None
    end: datetime | None = None
    agent: str = ""
    workflow: str = ""
    tool: str = ""
    actor: str = ""
    outcome: str = ""
    risk: str = ""
    verb: str = ""
    q: str = ""
    run: int | None = None
    before: int | None = None
    after: int | None = None
    raw: dict[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def from_form(cls, form: AuditFilterForm) -> "AuditFilters":
        data = form.cleaned_data
        raw = {
            key: form.data.get(key, "").strip()
            for key in FILTER_KEYS
            if form.data.get(key, "").strip()
        }
        return cls(
            start=data.get("from"),
            end=data.get("to"),
            agent=data.get("agent", ""),
            workflow=data.get("workflow", ""),
            tool=data.get("tool", ""),
            actor=data.get("actor", ""),
            outcome=data.get("outcome", ""),
            risk=data.get("risk", ""),
            verb=data.get("verb", ""),
            q=data.get("q", ""),
            run=data.get("run"),
            before=data.get("before"),
            after=data.get("after"),
            raw=raw,
        )

    @property
    def active(self) -> bool:
        return bool(self.raw)

    def querystring(self) -> str:
        """The filters (without the page cursor) as a query string."""
        return urlencode(self.raw)


def parse_filters(query) -> tuple[AuditFilters | None, AuditFilterForm]:
    """The filters of a query string, or None with the form carrying the errors."""
    form = AuditFilterForm(query)
    if not form.is_valid():
        return None, form
    return AuditFilters.from_form(form), form


def _verb_filter(records: QuerySet, verb: str) -> QuerySet:
    if verb.endswith(".*"):
        return records.filter(verb__startswith=verb[:-1])
    if verb.endswith("."):
        return records.filter(verb__startswith=verb)
    if "." not in verb:
        return records.filter(verb__startswith=verb + ".")
    return records.filter(verb=verb)


def _text_filter(records: QuerySet, text: str) -> QuerySet:
    if connections[records.db].vendor == "postgresql":
        query = SearchQuery(text, config=TEXT_CONFIG, search_type="websearch")
        return records.alias(reason_tsv=ReasonVector("reason")).filter(reason_tsv=query)
    for word in text.split():
        records = records.filter(reason__icontains=word.strip('"'))
    return records


def audit_records(filters: AuditFilters) -> QuerySet[AuditRecord]:
    """Every record the filters select, unordered and without the page cursor (the export
    reads it in its own keyset chunks)."""
    records = AuditRecord.objects.all()
    if filters.start is not None:
        records = records.filter(at__gte=filters.start)
    if filters.end is not None:
        records = records.filter(at__lt=filters.end)
    if filters.agent:
        agent_id = Agent.objects.filter(name=filters.agent).values_list("pk", flat=True).first()
        records = records.filter(agent_id=agent_id)
    if filters.workflow:
        records = records.filter(workflow=filters.workflow)
    if filters.tool:
        records = records.filter(tool=filters.tool)
    if filters.actor:
        records = records.filter(actor=filters.actor)
    if filters.outcome:
        records = records.filter(outcome=filters.outcome)
    if filters.risk:
        low, high = band_range(filters.risk)
        records = records.filter(risk__gte=low, risk__lte=high)
    if filters.verb:
        records = _verb_filter(records, filters.verb)
    if filters.run is not None:
        records = records.filter(run_id=filters.run)
    if filters.q:
        records = _text_filter(records, filters.q)
    return records


def newest_first(filters: AuditFilters) -> tuple[str, ...]:
    """The order of pages: by ``seq``; for a range that ends ("to"), by time then ``seq``.

    The chain is appended in time order, but PostgreSQL does not know that ``at`` and ``seq``
    rise together: for a range ending in the past, ``seq`` order would walk back from the newest
    record to reach it (seconds on a million records). Ordered by time, the ``at`` index serves
    the range and the order at once. A range open to now ("from" alone) starts at the newest
    records, so it keeps ``seq`` order, where the ``(column, seq)`` indexes of the other filters
    serve filter and order together. (Records appended at the same moment by concurrent writers
    may be milliseconds apart in ``at`` and in the opposite order in ``seq``; both orders are
    exact keysets.)"""
    return ("-at", "-seq") if filters.end is not None else ("-seq",)


def beyond(
    records: QuerySet, filters: AuditFilters, seq: int, *, older: bool, at: datetime | None = None
) -> QuerySet:
    """The records after the record ``seq`` in the page order (``older``) or before it."""
    if filters.end is None:
        return records.filter(seq__lt=seq) if older else records.filter(seq__gt=seq)
    if at is None:
        at = AuditRecord.objects.filter(seq=seq).values_list("at", flat=True).first()
        if at is None:  # a cursor that names no record: its place by seq alone
            return records.filter(seq__lt=seq) if older else records.filter(seq__gt=seq)
    if older:
        return records.filter(at__lte=at).filter(Q(at__lt=at) | Q(seq__lt=seq))
    return records.filter(at__gte=at).filter(Q(at__gt=at) | Q(seq__gt=seq))


def _reverse(order: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(key[1:] if key.startswith("-") else f"-{key}" for key in order)


@dataclass
class AuditPage:
    records: list[AuditRecord]
    older: int | None  # the ``before`` cursor of the next older page, if any
    newer: int | None  # the ``after`` cursor of the next newer page, if any


def audit_page(filters: AuditFilters, *, size: int = PAGE_SIZE) -> AuditPage:
    """One page of the filtered records, newest first, by keyset (``seq``, or time then ``seq``
    for a range that ends): every page costs the same however deep it is."""
    records = audit_records(filters)
    order = newest_first(filters)
    if filters.after is not None:
        newer_than = beyond(records, filters, filters.after, older=False)
        rows = list(newer_than.order_by(*_reverse(order))[: size + 1])
        more_newer = len(rows) > size
        rows = rows[:size][::-1]
        if not rows:
            return AuditPage([], None, None)
        last = rows[-1]
        more_older = beyond(records, filters, last.seq, older=True, at=last.at).exists()
        return AuditPage(
            rows, last.seq if more_older else None, rows[0].seq if more_newer else None
        )
    if filters.before is not None:
        records_page = beyond(records, filters, filters.before, older=True)
    else:
        records_page = records
    rows = list(records_page.order_by(*order)[: size + 1])
    more_older = len(rows) > size
    rows = rows[:size]
    newer = None
    if filters.before is not None and rows:
        first = rows[0]
        if beyond(records, filters, first.seq, older=False, at=first.at).exists():
            newer = first.seq
    return AuditPage(rows, rows[-1].seq if more_older else None, newer)
