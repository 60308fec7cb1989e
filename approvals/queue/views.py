"""The approval queue and the request page. htmx requests get the page's named partial; every
action also works as a plain form. Conflicts (decided, claimed by someone else) answer 409 with
the refreshed fragment, invalid input 422, and a refusal (other team, separation of duties) 403
with its message: always a fragment swapped in place, never an error page.
``LiveQueue`` and ``LiveRequest`` render the same partials for the websocket."""

import json
from typing import Any

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Q
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import patch_vary_headers
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from approvals.access import grants_visible_to, has_role, visible_to
from approvals.policy.models import Grant
from approvals.policy.services import grant_revoke
from approvals.policy.similar import REVIEWER
from approvals.queue import selectors
from approvals.queue.models import OPEN, ApprovalRequest, RequestKind
from approvals.queue.selectors import QueueFilters
from approvals.queue.services import approval_claim, approval_decide, approval_release
from approvals.queue.transitions import AlreadyDecided, ClaimedByOther, StaleReview
from approvals.roles import MANAGE_POLICY, REVIEW, role_required
from orchestration.canonical import args_diff
from orchestration.ledger.models import AuditRecord
from orchestration.registry.declare import RegistryError, get_tool
from orchestration.registry.models import Tool
from orchestration.runs import selectors as run_selectors
from orchestration.runs.access import run_access
from orchestration.runs.forms import WorkflowInputForm
from orchestration.runs.views import oob

QUEUE = "approvals/queue.html"
REQUEST = "approvals/request.html"
FORMS = ("edit", "reject", "halt", "answer")


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


# --- the queue ----------------------------------------------------------------------------


def queue_context(user, filters: QueueFilters) -> dict[str, Any]:
    rows = selectors.queue_rows(user, filters)
    return {
        "rows": rows,
        "counts": selectors.queue_counts(user, rows),
        "filters": filters,
        "query": filters.querystring(),
    }


@role_required(REVIEW)
def queue(request: HttpRequest) -> HttpResponse:
    filters = QueueFilters.from_query(request.GET)
    context = queue_context(request.user, filters)
    context["choices"] = selectors.filter_choices(request.user)
    return _render(request, QUEUE, "queue-live", context)


# --- one request --------------------------------------------------------------------------


def _get(request_id: int, user) -> ApprovalRequest:
    """The request, if it exists; another team's is refused (403), not hidden."""
    approval = ApprovalRequest.objects.select_related("claimed_by").filter(pk=request_id).first()
    if approval is None:
        raise Http404("No such request.")
    if not visible_to(user).filter(pk=request_id).exists():
        raise PermissionDenied(f"This request is for the {approval.team} team.")
    return approval


def edit_form(approval: ApprovalRequest, data=None) -> WorkflowInputForm | None:
    if approval.kind != RequestKind.ACTION:
        return None
    try:
        schema = get_tool(approval.tool).schema
    except RegistryError:
        return None
    args = approval.args_under_review
    form = WorkflowInputForm(schema, data, prefix="arg", initial=args)
    for name, field in form.fields.items():
        if name in args:
            field.initial = args[name]
    return form


def _similar_permitted(approval: ApprovalRequest) -> bool:
    """Whether the rule lets a reviewer "approve and allow similar" (the service checks again)."""
    if approval.kind != RequestKind.ACTION or not (approval.obligations or {}).get("allow_similar"):
        return False
    return not Tool.objects.filter(name=approval.tool, allow_similar_forbidden=True).exists()


def request_context(approval: ApprovalRequest, user, **extra: Any) -> dict[str, Any]:
    selectors.decorate(approval, user)
    run = run_selectors.run_get(approval.run_id)
    verdict = approval.verdict or {}
    context = {
        "approval": approval,
        "is_open": approval.status in OPEN,
        "run": run,
        "facts": run_selectors.run_facts(run) if run else {},
        "timeline": run_selectors.run_timeline(run, hidden=run_access().hidden_steps(user, run))
        if run
        else [],
        "args_rows": run_selectors.pairs(approval.args_under_review or {}),
        "decided_by_you": bool(user and approval.decisions.filter(reviewer=user).exists()),
        "factors": verdict.get("factors") or [],
        "rules": verdict.get("rules") or [],
        "policy_version": verdict.get("policy_version"),
        "verdict_reason": verdict.get("reason", ""),
        "related": selectors.related_open(approval, user),
        "snapshot": selectors.request_snapshot(approval),
        "allow_similar": _similar_permitted(approval),
        "open_form": "",
        "errors": {},
        **extra,
    }
    if "form" not in context:
        context["form"] = edit_form(approval)
    return context


def _request_response(
    request: HttpRequest, approval: ApprovalRequest, partial: str, status: int = 200, **extra
) -> HttpResponse:
    approval.refresh_from_db()
    context = request_context(approval, request.user, **extra)
    return _render(request, REQUEST, partial, context, status)


@role_required(REVIEW)
def request_detail(request: HttpRequest, request_id: int) -> HttpResponse:
    approval = _get(request_id, request.user)
    form = request.GET.get("form", "")
    return _request_response(
        request, approval, "request-panel", open_form=form if form in FORMS else ""
    )


def _refused(request: HttpRequest, approval: ApprovalRequest, exc: Exception) -> HttpResponse:
    """A conflict or a refusal, answered with the refreshed panel and the reason."""
    if isinstance(exc, AlreadyDecided):
        approval.refresh_from_db()
        if approval.status in OPEN:  # this reviewer decided it before
            message, status = f"You {exc}.", 409
        else:
            who = approval.decided_by or "someone else"
            message = f"This request was already decided by {who} ({approval.status})."
            status = 409
    elif isinstance(exc, StaleReview):
        message, status = str(exc), 409
    elif isinstance(exc, ClaimedByOther):
        message, status = f"This request is claimed by {exc.request.claimed_by}.", 409
    else:
        message, status = " ".join(getattr(exc, "messages", [str(exc)])), 403
    return _request_response(request, approval, "request-panel", status, action_error=message)


def _done(request: HttpRequest, approval: ApprovalRequest, message: str) -> HttpResponse:
    if _partial(request):
        return _request_response(request, approval, "request-panel", notice=message)
    from django.contrib import messages

    messages.success(request, message)
    return redirect("approvals:request", request_id=approval.pk)


@role_required(REVIEW)
@require_POST
def request_claim(request: HttpRequest, request_id: int) -> HttpResponse:
    approval = _get(request_id, request.user)
    try:
        approval_claim(request=approval.pk, reviewer=request.user)
    except (AlreadyDecided, ClaimedByOther, PermissionDenied) as exc:
        return _refused(request, approval, exc)
    return _done(request, approval, "You hold this request.")


@role_required(REVIEW)
@require_POST
def request_release(request: HttpRequest, request_id: int) -> HttpResponse:
    approval = _get(request_id, request.user)
    try:
        approval_release(request=approval.pk, reviewer=request.user)
    except PermissionDenied as exc:
        return _refused(request, approval, exc)
    return _done(request, approval, "Released: anyone on the team may take it.")


def _field_errors(exc: ValidationError) -> dict[str, str]:
    if hasattr(exc, "error_dict"):
        return {k: " ".join(v[0].messages) for k, v in exc.error_dict.items()}
    return {"general": " ".join(exc.messages)}


@role_required(REVIEW)
@require_POST
def request_decide(request: HttpRequest, request_id: int) -> HttpResponse:
    approval = _get(request_id, request.user)
    verdict = request.POST.get("verdict", "")
    comment = request.POST.get("comment", "").strip()
    # The hash of the arguments the page showed; deciding on any other is a conflict.
    shown_hash = request.POST.get("action_hash", "")
    if approval.status in OPEN and shown_hash != approval.action_hash:
        return _refused(request, approval, StaleReview(approval))
    kwargs: dict[str, Any] = {"comment": comment}
    extra: dict[str, Any] = {}
    similar = request.POST.get("allow_similar", "")
    if similar and verdict in {"approve", "edit"}:
        kwargs["allow_similar"] = similar
    if verdict in {"reject", "halt"} and not comment:
        what = "rejecting this action" if verdict == "reject" else "halting the run"
        errors = {"comment": f"Say why you are {what}: the agent's owner and the audit see it."}
        return _request_response(
            request, approval, "request-panel", 422, open_form=verdict, errors=errors
        )
    if verdict == "edit":
        form = edit_form(approval, request.POST)
        if form is None:
            raise Http404("This request cannot be edited.")
        if not form.is_valid():
            return _request_response(
                request, approval, "request-panel", 422, open_form="edit", form=form
            )
        edited = form.workflow_input()
        if request.POST.get("confirm") != "1":
            changes = args_diff(approval.args_under_review, edited)
            diff = [(k, old, new) for k, (old, new) in changes.items()]
            return _request_response(
                request, approval, "request-panel", open_form="edit", form=form,
                diff=diff, confirming=True, comment=comment,
            )  # fmt: skip
        kwargs["args"] = edited
        extra["form"] = form
    elif verdict == "answer":
        kwargs["answer"] = request.POST.get("answer", "")
    elif verdict not in {"approve", "reject", "halt"}:
        return _request_response(
            request, approval, "request-panel", 422, errors={"general": "Choose a decision."}
        )
    try:
        decided = approval_decide(
            request=approval.pk,
            reviewer=request.user,
            verdict=verdict,
            shown_hash=shown_hash,
            **kwargs,
        )
    except (AlreadyDecided, ClaimedByOther, StaleReview, PermissionDenied) as exc:
        return _refused(request, approval, exc)
    except ValidationError as exc:
        errors = _field_errors(exc)
        form = extra.get("form")
        if form is not None:
            for name, message in errors.items():
                form.add_error(name if name in form.fields else None, message)
        return _request_response(
            request, approval, "request-panel", 422, open_form=verdict, errors=errors, **extra
        )
    if decided.status in OPEN:
        given = len(selectors.approvers(decided))
        message = (
            f"Your {'edit' if verdict == 'edit' else 'approval'} is recorded: "
            f"{given} of {decided.quorum} approvals; another reviewer must approve."
        )
    else:
        message = f"Request {decided.pk}: {decided.get_status_display()}."
    if "allow_similar" in kwargs:
        scope = "for this run" if kwargs["allow_similar"] == "run" else "for 1 hour"
        message += f" Similar {approval.tool} actions are allowed {scope}."
    return _done(request, approval, message)


# --- reviewers' "allow similar" grants of a run -------------------------------------------

RUN_GRANTS = "approvals/run_grants.html"


def review_or_policy(view):
    """Reviewers and policy admins; other signed-in users get 403."""

    @login_required
    def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if not has_role(request.user, REVIEW, MANAGE_POLICY):
            raise PermissionDenied("Only reviewers and policy admins see these grants.")
        return view(request, *args, **kwargs)

    return wrapped


def run_grants_active(run_id: int, viewer) -> list[Grant]:
    """Active reviewer grants of a run that ``viewer`` may see (``grants_visible_to``): the
    run-scoped ones and the hour-scoped ones reviewers created while deciding this run's
    requests (found through their request, or the ledger)."""
    hour_ids = set()
    decided = AuditRecord.objects.filter(
        run_id=run_id, verb="approval.decided", payload__contains='"allow_similar"'
    ).values_list("payload", flat=True)
    for payload in decided:
        similar = json.loads(payload).get("allow_similar") or {}
        if similar.get("grant"):
            hour_ids.add(similar["grant"])
    now = timezone.now()
    grants = (
        grants_visible_to(viewer)
        .filter(source=REVIEWER, revoked_at__isnull=True)
        .filter(Q(run_id=run_id) | Q(request__run_id=run_id) | Q(pk__in=hour_ids))
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        .select_related("created_by", "agent")
        .order_by("id")
    )
    return list(grants)


def _run_grants_response(
    request: HttpRequest, run_id: int, status: int = 200, **extra: Any
) -> HttpResponse:
    context = {
        "run_id": run_id,
        "grants": run_grants_active(run_id, request.user),
        "next": reverse("runs:detail", kwargs={"run_id": run_id}),
        **extra,
    }
    return _render(request, RUN_GRANTS, "run-grants", context, status)


@review_or_policy
def run_grants(request: HttpRequest, run_id: int) -> HttpResponse:
    return _run_grants_response(request, run_id)


@review_or_policy
@require_POST
def run_grant_revoke(request: HttpRequest, grant_id: int) -> HttpResponse:
    """Revoke a reviewer's "allow similar" grant in one click (admins' grants are revoked on the
    policy pages). Answers the run's grants fragment over htmx, else redirects to ``next``."""
    grant = get_object_or_404(Grant, pk=grant_id, source=REVIEWER)
    run_id = grant.run_id
    error = ""
    try:
        grant_revoke(grant=grant, by=request.user)
    except ValidationError as exc:
        error = " ".join(exc.messages)
    if _partial(request) and request.POST.get("run_id", "").isdigit():
        run_id = int(request.POST["run_id"])
        notice = "" if error else f"Grant #{grant.pk} revoked."
        return _run_grants_response(
            request, run_id, 409 if error else 200, notice=notice, action_error=error
        )
    from django.contrib import messages

    if error:
        messages.error(request, error)
    else:
        messages.success(request, f"Grant #{grant.pk} revoked.")
    target = request.POST.get("next", "")
    if not url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        target = reverse("runs:detail", kwargs={"run_id": run_id}) if run_id else "/"
    return redirect(target)


def request_url(approval: ApprovalRequest) -> str:
    return reverse("approvals:request", kwargs={"request_id": approval.pk})


# --- live fragments for the websocket -----------------------------------------------------


def _viewer(user_id: int | None):
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
    return user if selectors.can_review(user) else None


class LiveQueue:
    """The queue over the websocket: the counts and the whole ordered list on (re)connect, then
    again whenever what the viewer would see changed (a new request in its place, a claim, a
    request that left). Countdown text is left to queue.js, so idle renders send nothing."""

    def __init__(self, filters: QueueFilters):
        self.filters = filters
        self.sent: dict[str, str] = {}

    def update(self, user_id: int | None, changed: set[int]) -> list[str] | None:
        user = _viewer(user_id)
        if user is None:
            return None
        context = queue_context(user, self.filters)
        fragments = {
            "queue-counts": render_to_string(f"{QUEUE}#queue-counts", context),
            "queue-body": render_to_string(f"{QUEUE}#queue-body", context),
        }
        # One message each: HTML parsing would drop a <tbody> that follows a <p>.
        messages = [oob(html) for key, html in fragments.items() if self.sent.get(key) != html]
        self.sent = fragments
        return messages


class LiveRequest:
    """One request's page: its state (status, claim) whenever it changes, and its decision forms
    only when whether it is open changes (so a half-typed reason survives)."""

    def __init__(self, request_id: int, csrf_token: str = ""):
        self.request_id = request_id
        self.csrf_token = csrf_token
        self.sent: dict[str, str] = {}

    def update(self, user_id: int | None, changed: set[int]) -> list[str] | None:
        user = _viewer(user_id)
        if user is None:
            return None
        try:
            approval = _get(self.request_id, user)
        except PermissionDenied:
            return None
        context = request_context(approval, user, csrf_token=self.csrf_token)
        fragments = {
            "request-state": render_to_string(f"{REQUEST}#request-state", context),
            "request-decide": render_to_string(f"{REQUEST}#request-decide", context),
            "related": render_to_string(f"{REQUEST}#related", context),
        }
        if not self.sent:  # the page itself has the forms as the reviewer left them
            self.sent["request-decide"] = fragments["request-decide"]
        parts = [oob(html) for key, html in fragments.items() if self.sent.get(key) != html]
        self.sent = fragments
        return ["".join(parts)] if parts else []
