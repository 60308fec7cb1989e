"""The run pages: list, detail with its live timeline, halt, retry, and starting a run from a
workflow's form. htmx requests get the page's named partial; every action also works as a plain
form. ``LiveList`` and ``LiveDetail`` render the same partials for the websocket."""

import re
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.middleware.csrf import get_token
from django.shortcuts import get_object_or_404, redirect
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.cache import patch_vary_headers
from django.views.decorators.http import require_POST
from django_htmx.http import HttpResponseClientRedirect

from orchestration.registry.declare import RegistryError, get_workflow, latest_workflows
from orchestration.runs import selectors
from orchestration.runs.access import run_access
from orchestration.runs.forms import RunOptionsForm, WorkflowInputForm
from orchestration.runs.models import Run, RunStatus
from orchestration.runs.selectors import RunFilters
from orchestration.runs.services import RunError, run_halt, run_retry, run_start

LIST = "runs/list.html"
DETAIL = "runs/detail.html"
ACTED = "run-summary"  # the partial that answers halt and retry; the socket keeps the timeline


def access_required(may: str) -> Callable:
    """Anonymous users go to the login page; signed-in users the run access refuses (its
    ``can_view``, ``can_halt`` or ``can_operate``, named by ``may``) get 403."""

    def decorator(view: Callable) -> Callable:
        @wraps(view)
        def guarded(request: HttpRequest, *args, **kwargs) -> HttpResponse:
            if not getattr(run_access(), may)(request.user):
                raise PermissionDenied
            return view(request, *args, **kwargs)

        return login_required(guarded)

    return decorator


def _partial(request: HttpRequest) -> bool:
    htmx = getattr(request, "htmx", None)
    return bool(htmx) and not htmx.boosted and not htmx.history_restore_request


def _render(
    request: HttpRequest, template: str, partial: str, context: dict, status: int = 200
) -> HttpResponse:
    name = f"{template}#{partial}" if _partial(request) else template
    response = TemplateResponse(request, name, context, status=status)
    patch_vary_headers(response, ("HX-Request",))
    return response


# --- list ---------------------------------------------------------------------------------


@access_required("can_view")
def run_list(request: HttpRequest) -> HttpResponse:
    filters = RunFilters.from_query(request.GET)
    runs, next_before = selectors.run_page(filters)
    context = {
        "runs": runs,
        "filters": filters,
        "query": filters.querystring(),
        "base_query": filters.querystring(page=False),
        "next_before": next_before,
        "choices": selectors.filter_choices(),
        "can_start": run_access().can_operate(request.user),
    }
    return _render(request, LIST, "runs-table", context)


# --- detail, halt, retry ------------------------------------------------------------------


def detail_context(run: Run, user, **extra: Any) -> dict[str, Any]:
    """What ``user`` may see and do of ``run``: the same for the page and its socket."""
    access = run_access()
    refusal = "" if run.is_final or not access.can_halt(user) else access.halt_refusal(user, run)
    hidden = access.hidden_steps(user, run)
    withheld = ", ".join(sorted(set(hidden.values())))
    return {
        "run": run,
        "facts": selectors.run_facts(run, withheld=withheld),
        "timeline": selectors.run_timeline(run, hidden=hidden),
        "can_halt": not run.is_final and access.can_halt(user) and not refusal,
        "halt_refusal": refusal,
        "can_retry": run.status == RunStatus.FAILED and access.can_operate(user),
        **extra,
    }


def _detail(
    request: HttpRequest, run_id: int, partial: str, status: int = 200, **extra: Any
) -> HttpResponse:
    run = selectors.run_get(run_id)
    if run is None:
        raise Http404("No such run.")
    return _render(request, DETAIL, partial, detail_context(run, request.user, **extra), status)


@access_required("can_view")
def run_detail(request: HttpRequest, run_id: int) -> HttpResponse:
    run = get_object_or_404(Run, pk=run_id)
    access = run_access()
    links, panels = access.page_links(request.user, run), access.page_panels(request.user, run)
    return _detail(request, run_id, "run-live", links=links, panels=panels)


@access_required("can_view")
def run_timeline(request: HttpRequest, run_id: int) -> HttpResponse:
    run = get_object_or_404(Run, pk=run_id)
    hidden = run_access().hidden_steps(request.user, run)
    timeline = selectors.run_timeline(run, hidden=hidden)
    return TemplateResponse(request, f"{DETAIL}#timeline", {"timeline": timeline})


def _done(request: HttpRequest, run_id: int, message: str) -> HttpResponse:
    if _partial(request):
        return _detail(request, run_id, ACTED, notice=message)
    messages.success(request, message)
    return redirect("runs:detail", run_id=run_id)


@access_required("can_halt")
@require_POST
def run_halt_view(request: HttpRequest, run_id: int) -> HttpResponse:
    run = get_object_or_404(Run, pk=run_id)
    refusal = "" if run.is_final else run_access().halt_refusal(request.user, run)
    if refusal:
        return _detail(request, run_id, ACTED, status=403, action_error=refusal)
    reason = request.POST.get("reason", "").strip()
    if not reason:
        error = "Say why you are halting the run: the agent's owner and the audit trail see it."
        return _detail(request, run_id, ACTED, status=422, halt_error=error)
    try:
        run_halt(run=run_id, by=request.user, reason=reason)
    except PermissionDenied as exc:  # a request opened meanwhile: run_halt asks again, locked
        return _detail(request, run_id, ACTED, status=403, action_error=str(exc))
    except RunError as exc:
        return _detail(request, run_id, ACTED, status=409, action_error=" ".join(exc.messages))
    return _done(request, run_id, f"Run {run_id} halted.")


@access_required("can_operate")
@require_POST
def run_retry_view(request: HttpRequest, run_id: int) -> HttpResponse:
    get_object_or_404(Run, pk=run_id)
    try:
        run_retry(run=run_id, by=request.user)
    except RunError as exc:
        return _detail(request, run_id, ACTED, status=409, action_error=" ".join(exc.messages))
    return _done(request, run_id, f"Run {run_id} will retry from its failed step.")


# --- starting a run -----------------------------------------------------------------------


@access_required("can_operate")
def run_pick(request: HttpRequest) -> HttpResponse:
    return _render(request, "runs/new.html", "workflows", {"workflows": latest_workflows()})


@access_required("can_operate")
def run_new(request: HttpRequest, name: str) -> HttpResponse:
    try:
        definition = get_workflow(name)
    except RegistryError:
        raise Http404("No such workflow.") from None
    if name.startswith("_"):
        raise Http404("No such workflow.")
    data = request.POST if request.method == "POST" else None
    form = WorkflowInputForm(definition.input_schema, data)
    options = RunOptionsForm(data, prefix="run")
    status = 200
    if data is not None:
        run = _start(request, name, form, options)
        if run is not None:
            url = run_url(run)
            return HttpResponseClientRedirect(url) if _partial(request) else redirect(url)
        status = 422
    context = {"workflow": definition, "form": form, "options": options}
    return _render(request, "runs/start.html", "start-form", context, status)


def _start(request, name: str, form: WorkflowInputForm, options: RunOptionsForm) -> Run | None:
    if not (form.is_valid() and options.is_valid()):
        return None
    goal = options.cleaned_data["goal"].strip()
    try:
        return run_start(
            workflow=name,
            input=form.workflow_input(),
            agent=options.cleaned_data["agent"],
            intent={"goal": goal} if goal else None,
            started_by=request.user,
        )
    except RunError as exc:
        form.add_schema_errors(exc.messages)
        return None


def run_url(run: Run) -> str:
    return reverse("runs:detail", kwargs={"run_id": run.pk})


# --- live fragments for the websocket -----------------------------------------------------

_FIRST_TAG = re.compile(r"^(\s*<[a-zA-Z][a-zA-Z0-9-]*)")


def oob(html: str, swap: str = "true") -> str:
    """Mark a partial's root element for an out-of-band swap by its id."""
    return _FIRST_TAG.sub(rf'\1 hx-swap-oob="{swap}"', html, count=1)


def viewer(user_id: int | None):
    """The user re-read, so a role taken away applies to an open socket at its next update."""
    user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
    return user if run_access().can_view(user) else None


def csrf_token_for(cookies: dict[str, str]) -> str:
    """A CSRF token for forms rendered outside a request (htmx also sends the page's header)."""
    secret = cookies.get(settings.CSRF_COOKIE_NAME, "")
    if len(secret) != 32:
        return ""
    request = HttpRequest()
    request.META["CSRF_COOKIE"] = secret
    return get_token(request)


class LiveList:
    """The list page over the websocket: the whole table body on (re)connect, then each changed
    row by id, and new runs that match the page's filters at the top (first page only).

    Rows changed in place and new rows go in separate messages: in one message, HTML parsing
    would drop a ``<tbody>`` wrapper that follows a top-level ``<tr>``."""

    def __init__(self, filters: RunFilters):
        self.filters = filters
        self.rows: dict[int, str] | None = None

    def update(self, user_id: int | None, changed: set[int]) -> list[str] | None:
        """The messages to send; None when the user may no longer look."""
        if viewer(user_id) is None:
            return None
        if self.rows is None:
            return [self._body()]
        updated, added = [], []
        for run_id in sorted(changed):
            known = run_id in self.rows
            if not known and self.filters.before:
                continue  # an older page: new runs belong on the first
            run = selectors.run_row(run_id, None if known else self.filters)
            if run is None:
                continue
            html = render_to_string(f"{LIST}#run-row", {"run": run})
            if not known:
                added.insert(0, html)
            elif html != self.rows[run_id]:
                updated.append(oob(html))
            self.rows[run_id] = html
        messages = ["".join(updated)] if updated else []
        if added and len(added) == len(self.rows):  # the list was empty: replace its body
            messages.append(self._body())
        elif added:
            messages.append(f'<tbody hx-swap-oob="afterbegin:#runs-body">{"".join(added)}</tbody>')
        return messages

    def _body(self) -> str:
        runs, _ = selectors.run_page(self.filters)
        self.rows = {run.pk: "" for run in runs}
        return oob(render_to_string(f"{LIST}#runs-body", {"runs": runs}))


class LiveDetail:
    """A run's page over the websocket: header, actions and the whole timeline on (re)connect;
    then what changed: the header, the actions (only when they change, so a half-typed halt
    reason survives), changed timeline entries by id and new ones appended."""

    def __init__(self, run_id: int, csrf_token: str = ""):
        self.run_id = run_id
        self.csrf_token = csrf_token
        self.sent: dict[str, str] | None = None
        self.order: list[str] = []

    def update(self, user_id: int | None, changed: set[int]) -> list[str] | None:
        """The messages to send; None when the user may no longer look."""
        user = viewer(user_id)
        if user is None:
            return None
        run = selectors.run_get(self.run_id)
        if run is None:
            raise Http404("No such run.")
        context = detail_context(run, user, csrf_token=self.csrf_token)
        fragments = {
            "run-header": render_to_string(f"{DETAIL}#run-header", context),
            "run-actions": render_to_string(f"{DETAIL}#run-actions", context),
        }
        entries = {
            entry.dom_id: render_to_string(f"{DETAIL}#timeline-entry", {**context, "entry": entry})
            for entry in context["timeline"]
        }
        order = list(entries)
        sent = self.sent or {}
        parts = [oob(html) for key, html in fragments.items() if sent.get(key) != html]
        if self.sent is None or order[: len(self.order)] != self.order:
            parts.append(oob(render_to_string(f"{DETAIL}#timeline", context)))
        else:
            parts += [oob(entries[key]) for key in self.order if sent.get(key) != entries[key]]
            added = "".join(entries[key] for key in order[len(self.order) :])
            if added:
                parts.append(f'<ol hx-swap-oob="beforeend:#timeline-items">{added}</ol>')
        self.sent = {**fragments, **entries}
        self.order = order
        return ["".join(parts)] if parts else []
