"""The policy admin pages: rules, argument factors, thresholds, tools' risk metadata, agents with
their grants, and published versions with the draft's diff and Publish.

Every page is for the Policy admin role (``MANAGE_POLICY``). Every change goes through a service
that writes its ledger record; rules, factors, thresholds and tools' risk metadata are the
*draft*, which the gate does not see until it is published. htmx requests get the page's named
partial; every form also works without JavaScript."""

import difflib
import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.db.models import Count, Q
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import patch_vary_headers
from django.views.decorators.http import require_POST
from django_htmx.http import HttpResponseClientRedirect

from approvals.policy.drafts import (
    agent_update,
    factor_delete,
    factor_save,
    rule_delete,
    rule_save,
    thresholds_save,
)
from approvals.policy.forms import (
    AgentForm,
    FactorForm,
    GrantForm,
    PublishForm,
    RuleForm,
    ThresholdsForm,
    ToolRiskForm,
    check_condition,
    pattern_problem,
    split_list,
    tool_names,
)
from approvals.policy.models import (
    ArgumentFactor,
    AutonomyThreshold,
    Grant,
    PolicyEvaluation,
    PolicyVersion,
    Rule,
)
from approvals.policy.services import (
    draft_snapshot,
    grant_create,
    grant_revoke,
    policy_publish,
    snapshot_diff,
)
from approvals.policy.simulate import simulate
from approvals.roles import MANAGE_POLICY, role_required
from orchestration.registry.models import Agent, Tool
from orchestration.registry.services import tool_update_risk

policy_admin = role_required(MANAGE_POLICY)


def _partial(request: HttpRequest) -> bool:
    htmx = getattr(request, "htmx", None)
    return bool(htmx) and not htmx.boosted and not htmx.history_restore_request


def _render(
    request: HttpRequest,
    template: str,
    partial: str | None,
    context: dict[str, Any],
    status: int = 200,
    *,
    tab: str,
) -> HttpResponse:
    """The page, or its partial for htmx. A full page also says whether the draft differs from
    the published policy."""
    if partial and _partial(request):
        name = f"{template}#{partial}"
    else:
        name = template
        context = {"tab": tab, "draft_pending": _draft_pending(), **context}
    response = TemplateResponse(request, name, context, status=status)
    patch_vary_headers(response, ("HX-Request",))
    return response


def _draft_pending() -> bool:
    latest = PolicyVersion.objects.order_by("-number").first()
    return latest is None or bool(snapshot_diff(latest.snapshot, draft_snapshot()))


def _done(request: HttpRequest, url: str, message: str) -> HttpResponse:
    messages.success(request, message)
    return HttpResponseClientRedirect(url) if _partial(request) else redirect(url)


def _add_errors(form, exc: ValidationError) -> None:
    if hasattr(exc, "error_dict"):
        for field, errors in exc.message_dict.items():
            form.add_error(field if field in form.fields else None, errors)
    else:
        form.add_error(None, exc.messages)


SAVED_TO_DRAFT = "saved to the draft; it takes effect when you publish it on the Versions page."


# --- live condition check -----------------------------------------------------------------


@policy_admin
@require_POST
def condition_validate(request: HttpRequest) -> HttpResponse:
    """The condition as the gate would check it, for the tools in scope: 200 with OK, or 422
    with the message and a pointer at the offending span."""
    if "tool_patterns" in request.POST:
        patterns = split_list(request.POST["tool_patterns"])
    else:
        patterns = split_list(request.POST.get("tool_pattern", ""))
    check = check_condition(
        request.POST.get("condition", ""), patterns, optional=request.POST.get("optional") == "1"
    )
    names = tool_names()
    scope_problems = [p for p in (pattern_problem(x, names) for x in patterns) if p]
    return TemplateResponse(
        request,
        "policy/condition.html#condition-check",
        {"check": check, "scope_problems": scope_problems},
        status=200 if check.ok else 422,
    )


# --- rules --------------------------------------------------------------------------------


def rule_hits(now=None) -> dict[str, dict[str, int]]:
    """How many evaluations each rule matched (enforced or in shadow) in the last 24 hours and
    7 days, by rule name.

    One query: the ``rules``/``shadow_rules`` lists of the last 7 days' evaluations, counted in
    Python. Fine at demo volume; at production volume this wants a per-rule daily counter
    written with the evaluation, or a JSON-array aggregate in SQL."""
    now = now or timezone.now()
    day_ago = now - timedelta(days=1)
    hits: dict[str, dict[str, int]] = defaultdict(lambda: {"day": 0, "week": 0})
    rows = PolicyEvaluation.objects.filter(created_at__gte=now - timedelta(days=7)).values_list(
        "created_at", "rules", "shadow_rules"
    )
    for at, rules, shadow in rows.iterator(chunk_size=2000):
        for name in {*(rules or []), *(shadow or [])}:
            hits[name]["week"] += 1
            if at >= day_ago:
                hits[name]["day"] += 1
    return hits


@policy_admin
def rule_list(request: HttpRequest) -> HttpResponse:
    hits = rule_hits()
    rules = [(rule, hits.get(rule.name, {"day": 0, "week": 0})) for rule in Rule.objects.all()]
    failing = sum(1 for rule, _ in rules if rule.last_error)
    context = {"rules": rules, "failing": failing}
    return _render(request, "policy/rules.html", None, context, tab="rules")


@policy_admin
def rule_edit(request: HttpRequest, pk: int | None = None) -> HttpResponse:
    rule = get_object_or_404(Rule, pk=pk) if pk else None
    title = rule.name if rule else ""
    status = 200
    if request.method == "POST":
        # The form writes into ``rule``; ``rule_save`` re-reads it under a lock.
        form = RuleForm(request.POST, instance=rule)
        if form.is_valid():
            try:
                saved = rule_save(rule_or_none=rule, data=form.draft_data(), by=request.user)
            except ValidationError as exc:
                _add_errors(form, exc)
            else:
                return _done(
                    request, reverse("policy:rules"), f"Rule “{saved.name}” {SAVED_TO_DRAFT}"
                )
        status = 422
    else:
        form = RuleForm(instance=rule)
        if rule:
            form.checked = check_condition(rule.condition, rule.tool_patterns)
    context = {"form": form, "rule": rule, "title": title}
    return _render(request, "policy/rule_form.html", "rule-form", context, status, tab="rules")


@policy_admin
@require_POST
def rule_delete_view(request: HttpRequest, pk: int) -> HttpResponse:
    rule = get_object_or_404(Rule, pk=pk)
    rule_delete(rule=rule, by=request.user)
    return _done(
        request,
        reverse("policy:rules"),
        f"Rule “{rule.name}” deleted from the draft; publish to take it out of force.",
    )


# --- argument factors ---------------------------------------------------------------------


@policy_admin
def factor_list(request: HttpRequest) -> HttpResponse:
    context = {"factors": ArgumentFactor.objects.all()}
    return _render(request, "policy/factors.html", None, context, tab="factors")


@policy_admin
def factor_edit(request: HttpRequest, pk: int | None = None) -> HttpResponse:
    factor = get_object_or_404(ArgumentFactor, pk=pk) if pk else None
    title = factor.name if factor else ""
    status = 200
    if request.method == "POST":
        form = FactorForm(request.POST, instance=factor)
        if form.is_valid():
            try:
                saved = factor_save(factor_or_none=factor, data=form.draft_data(), by=request.user)
            except ValidationError as exc:
                _add_errors(form, exc)
            else:
                message = f"Argument factor “{saved.name}” {SAVED_TO_DRAFT}"
                return _done(request, reverse("policy:factors"), message)
        status = 422
    else:
        form = FactorForm(instance=factor)
        if factor:
            form.checked = check_condition(factor.condition, factor.tool_patterns)
    context = {"form": form, "factor": factor, "title": title}
    return _render(
        request, "policy/factor_form.html", "factor-form", context, status, tab="factors"
    )


@policy_admin
@require_POST
def factor_delete_view(request: HttpRequest, pk: int) -> HttpResponse:
    factor = get_object_or_404(ArgumentFactor, pk=pk)
    factor_delete(factor=factor, by=request.user)
    return _done(
        request,
        reverse("policy:factors"),
        f"Argument factor “{factor.name}” deleted from the draft.",
    )


# --- thresholds ---------------------------------------------------------------------------


@policy_admin
def thresholds(request: HttpRequest) -> HttpResponse:
    current = {
        t.autonomy: {
            "allow_below": t.allow_below,
            "deny_above": t.deny_above,
            "quorum2_above": t.quorum2_above,
        }
        for t in AutonomyThreshold.objects.all()
    }
    status = 200
    if request.method == "POST":
        form = ThresholdsForm(request.POST, current=current)
        if form.is_valid():
            try:
                thresholds_save(values=form.values(), by=request.user)
            except ValidationError as exc:
                _add_errors(form, exc)
            else:
                return _done(request, reverse("policy:thresholds"), f"Thresholds {SAVED_TO_DRAFT}")
        status = 422
    else:
        form = ThresholdsForm(current=current)
    return _render(
        request,
        "policy/thresholds.html",
        "thresholds-form",
        {"form": form},
        status,
        tab="thresholds",
    )


# --- tools --------------------------------------------------------------------------------


@policy_admin
def tool_list(request: HttpRequest) -> HttpResponse:
    return _render(request, "policy/tools.html", None, {"tools": Tool.objects.all()}, tab="tools")


@policy_admin
def tool_edit(request: HttpRequest, pk: int) -> HttpResponse:
    tool = get_object_or_404(Tool, pk=pk)
    status = 200
    if request.method == "POST":
        form = ToolRiskForm(request.POST, instance=Tool.objects.get(pk=pk))
        if form.is_valid():
            try:
                tool_update_risk(tool=tool, by=request.user, **form.risk_changes())
            except ValidationError as exc:
                _add_errors(form, exc)
            else:
                message = f"Risk metadata of {tool.name} {SAVED_TO_DRAFT}"
                return _done(request, reverse("policy:tools"), message)
        status = 422
    else:
        form = ToolRiskForm(instance=tool)
    return _render(
        request,
        "policy/tool_form.html",
        "tool-form",
        {"form": form, "tool": tool},
        status,
        tab="tools",
    )


# --- agents and grants --------------------------------------------------------------------


@policy_admin
def agent_list(request: HttpRequest) -> HttpResponse:
    now = timezone.now()
    active = Q(grants__revoked_at__isnull=True) & (
        Q(grants__expires_at__isnull=True) | Q(grants__expires_at__gt=now)
    )
    agents = Agent.objects.annotate(active_grants=Count("grants", filter=active))
    return _render(request, "policy/agents.html", None, {"agents": agents}, tab="agents")


def _agent_context(agent: Agent, **extra: Any) -> dict[str, Any]:
    now = timezone.now()
    grants = list(agent.grants.select_related("created_by").order_by("-revoked_at", "tool_pattern"))
    for grant in grants:
        grant.expired = bool(grant.expires_at and grant.expires_at <= now)
        grant.used_up = grant.max_uses is not None and grant.uses >= grant.max_uses
    context = {
        "agent": agent,
        "grants": [g for g in grants if not g.revoked_at],
        "revoked": [g for g in grants if g.revoked_at],
        "ceiling": agent.tools.order_by("name").values_list("name", flat=True),
    }
    context.setdefault(
        "agent_form", AgentForm(initial={"autonomy": agent.autonomy, "status": agent.status})
    )
    context.setdefault("grant_form", GrantForm())
    return {**context, **extra}


@policy_admin
def agent_detail(request: HttpRequest, pk: int) -> HttpResponse:
    agent = get_object_or_404(Agent, pk=pk)
    status, extra = 200, {}
    if request.method == "POST":
        form = AgentForm(request.POST)
        if form.is_valid():
            try:
                agent_update(agent=agent, by=request.user, **form.cleaned_data)
            except ValidationError as exc:
                _add_errors(form, exc)
            else:
                url = reverse("policy:agent", kwargs={"pk": pk})
                return _done(request, url, f"{agent.name}: autonomy and status saved.")
        status, extra = 422, {"agent_form": form}
    return _render(
        request,
        "policy/agent.html",
        "agent-settings",
        _agent_context(agent, **extra),
        status,
        tab="agents",
    )


@policy_admin
@require_POST
def grant_add(request: HttpRequest, pk: int) -> HttpResponse:
    agent = get_object_or_404(Agent, pk=pk)
    form = GrantForm(request.POST)
    if form.is_valid():
        data = form.cleaned_data
        try:
            grant_create(
                agent=agent,
                tool_pattern=data["tool_pattern"],
                condition=data["condition"].strip(),
                expires_at=data["expires_at"],
                by=request.user,
            )
        except ValidationError as exc:
            _add_errors(form, exc)
        else:
            url = reverse("policy:agent", kwargs={"pk": pk})
            return _done(request, url, f"{agent.name} may now use {data['tool_pattern']}.")
    return _render(
        request,
        "policy/agent.html",
        "grant-form",
        _agent_context(agent, grant_form=form),
        422,
        tab="agents",
    )


@policy_admin
@require_POST
def grant_revoke_view(request: HttpRequest, pk: int) -> HttpResponse:
    grant = get_object_or_404(Grant.objects.select_related("agent"), pk=pk)
    try:
        grant_revoke(grant=grant, by=request.user)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
        url = reverse("policy:agent", kwargs={"pk": grant.agent_id})
        return HttpResponseClientRedirect(url) if _partial(request) else redirect(url)
    url = reverse("policy:agent", kwargs={"pk": grant.agent_id})
    if _partial(request):
        agent = get_object_or_404(Agent, pk=grant.agent_id)
        notice = f"Revoked: {agent.name} may no longer use {grant.tool_pattern} through this grant."
        return TemplateResponse(
            request, "policy/agent.html#grants", _agent_context(agent, notice=notice)
        )
    messages.success(request, f"Grant for {grant.tool_pattern} revoked.")
    return redirect(url)


# --- versions and publishing --------------------------------------------------------------


_TOKENS = re.compile(r"\w+|\s+|[^\w\s]")


@dataclass
class DiffLine:
    kind: str  # "add", "remove" or "same"
    text: str
    segments: list[tuple[str, bool]]  # the text in pieces, True for what the other side lacks


def _changed_segments(line: str, other: str) -> tuple[list, list]:
    """The two lines cut into runs of tokens, each run marked changed or not."""
    a, b = _TOKENS.findall(line[1:]), _TOKENS.findall(other[1:])  # the signs always differ
    left: list[tuple[str, bool]] = [(line[:1], False)]
    right: list[tuple[str, bool]] = [(other[:1], False)]
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if i2 > i1:
            left.append(("".join(a[i1:i2]), op != "equal"))
        if j2 > j1:
            right.append(("".join(b[j1:j2]), op != "equal"))
    return left, right


def diff_lines(diff: str) -> list[DiffLine]:
    """A snapshot diff, line by line, the file headers left out. An item that changed (a "-"
    and a "+" line for the same rule, factor, thresholds or tool) has what changed marked."""
    lines = []
    for line in diff.splitlines():
        if line.startswith(("--- ", "+++ ")):
            continue
        kind = {"+": "add", "-": "remove"}.get(line[:1], "same")
        lines.append(DiffLine(kind, line, [(line, False)]))
    added = {line.text[1:].split(": ", 1)[0]: line for line in lines if line.kind == "add"}
    for line in lines:
        if line.kind == "remove" and (pair := added.get(line.text[1:].split(": ", 1)[0])):
            line.segments, pair.segments = _changed_segments(line.text, pair.text)
    return lines


def _versions_context(**extra: Any) -> dict[str, Any]:
    versions = list(PolicyVersion.objects.select_related("published_by"))
    for version in versions:
        version.lines = diff_lines(version.diff)
    latest = versions[0] if versions else None
    draft = diff_lines(snapshot_diff(latest.snapshot if latest else {}, draft_snapshot()))
    context = {
        "versions": versions,
        "latest": latest,
        "draft_lines": draft,
        "publish_form": PublishForm(),
    }
    return {**context, **extra}


@policy_admin
def version_list(request: HttpRequest) -> HttpResponse:
    return _render(request, "policy/versions.html", None, _versions_context(), tab="versions")


@policy_admin
@require_POST
def publish(request: HttpRequest) -> HttpResponse:
    form = PublishForm(request.POST)
    problems: list[str] = []
    if form.is_valid():
        try:
            version = policy_publish(by=request.user, note=form.cleaned_data["note"].strip())
        except ValidationError as exc:
            if hasattr(exc, "error_dict"):
                problems = [f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items()]
            else:
                problems = exc.messages
        else:
            message = f"Published policy version {version.number}: the gate uses it from now on."
            return _done(request, reverse("policy:versions"), message)
    context = _versions_context(publish_form=form, publish_problems=problems)
    return _render(request, "policy/versions.html", "draft", context, 422, tab="versions")


@policy_admin
def simulation(request: HttpRequest) -> HttpResponse:
    """What would this draft do: the last days' evaluations replayed under the draft."""
    try:
        days = max(1, min(int(request.GET.get("days", 7)), 30))
    except ValueError:
        days = 7
    status, extra = 200, {}
    try:
        extra["report"] = simulate(days=days)
    except ValidationError as exc:
        status = 422
        extra["sim_problems"] = (
            [f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items()]
            if hasattr(exc, "error_dict")
            else exc.messages
        )
    if _partial(request):
        return TemplateResponse(request, "policy/versions.html#simulation", extra, status=status)
    context = _versions_context(**extra)
    return _render(request, "policy/versions.html", None, context, status, tab="versions")
