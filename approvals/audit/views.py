"""The auditor's pages: search, a decision, a run's replay. Auditors and policy admins only
(``role_required(AUDIT)``); the exports are async views in ``export``.

The search answers htmx requests with its results partial (the filter form stays as the user
is typing in it) and full requests with the page; invalid filters answer 400 with the form's
errors, in the partial or the page."""

from typing import Any

from django.contrib.auth import get_user_model
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.cache import patch_vary_headers
from django.utils.http import urlencode
from django_htmx.http import push_url

from approvals.access import has_role
from approvals.audit import selectors
from approvals.audit.search import (
    KNOWN_OUTCOMES,
    KNOWN_VERBS,
    AuditFilterForm,
    AuditFilters,
    audit_page,
    parse_filters,
)
from approvals.queue.models import Decision
from approvals.roles import AUDIT, REVIEW, role_required
from orchestration.registry.declare import latest_workflows
from orchestration.registry.models import Agent, Tool

SEARCH = "approvals/audit/search.html"
DECISION = "approvals/audit/decision.html"
REPLAY = "approvals/audit/run.html"


def _partial(request: HttpRequest) -> bool:
    htmx = getattr(request, "htmx", None)
    return bool(htmx) and not htmx.boosted and not htmx.history_restore_request


def search_context(
    request: HttpRequest, filters: AuditFilters | None, form: AuditFilterForm
) -> dict[str, Any]:
    page = audit_page(filters) if filters is not None else None
    records = selectors.decorate_rows(page.records) if page else []
    return {
        "form": form,
        "filters": filters,
        "records": records,
        "older": page.older if page else None,
        "newer": page.newer if page else None,
        "query": filters.querystring() if filters else "",
        "errors": [
            (form.fields[name].label if name in form.fields else "", message)
            for name, messages in form.errors.items()
            for message in messages
        ],
        **_suggestions(),
        "can_review": has_role(request.user, REVIEW),
        **selectors.ledger_status(),
    }


def _suggestions() -> dict[str, list[str]]:
    """What the filter inputs offer (any value may be typed): names from the registry and the
    accounts, not from the ledger, which may be large."""
    actors = ["system", "policy-gate"]
    users = get_user_model().objects.order_by("username").values_list("username", flat=True)
    actors += list(users[:500])
    return {
        "agents": list(Agent.objects.order_by("name").values_list("name", flat=True)),
        "workflows": sorted({w.name for w in latest_workflows() if not w.name.startswith("_")}),
        "tools": list(Tool.objects.order_by("name").values_list("name", flat=True)),
        "actors": actors,
        "outcomes": KNOWN_OUTCOMES,
        "verbs": KNOWN_VERBS,
    }


@role_required(AUDIT)
def audit_search(request: HttpRequest) -> HttpResponse:
    filters, form = parse_filters(request.GET)
    context = search_context(request, filters, form)
    status = 200 if filters is not None else 400
    if not _partial(request):
        response = TemplateResponse(request, SEARCH, context, status=status)
    else:
        response = TemplateResponse(request, f"{SEARCH}#audit-results", context, status=status)
        # The address bar gets the filters given, not the form's empty fields.
        given = urlencode([(k, v) for k, v in request.GET.items() if v.strip()])
        push_url(response, reverse("approvals:audit") + (f"?{given}" if given else ""))
    patch_vary_headers(response, ("HX-Request",))
    return response


@role_required(AUDIT)
def audit_decision(request: HttpRequest, decision_id: int) -> HttpResponse:
    decision = get_object_or_404(
        Decision.objects.select_related("request", "reviewer"), pk=decision_id
    )
    context = {
        **selectors.decision_context(decision),
        **selectors.ledger_status(),
        "can_review": has_role(request.user, REVIEW),
    }
    return TemplateResponse(request, DECISION, context)


@role_required(AUDIT)
def audit_run(request: HttpRequest, run_id: int) -> HttpResponse:
    replay = selectors.run_replay(run_id)
    if replay is None:
        raise Http404("No such run, and no record of one.")
    context = {
        **replay,
        **selectors.ledger_status(),
        "can_review": has_role(request.user, REVIEW),
    }
    return TemplateResponse(request, REPLAY, context)
