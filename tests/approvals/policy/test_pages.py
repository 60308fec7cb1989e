"""The policy admin pages: access by role, the draft edited through services with ledger records,
conditions checked as they are typed, publishing, thresholds, tools, agents and grants, and
Django's admin read-only for everything versioned or ledgered."""

import json
import re
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.utils import timezone

from approvals.policy.models import (
    ArgumentFactor,
    AutonomyThreshold,
    Grant,
    PolicyEvaluation,
    PolicyVersion,
    Rule,
)
from approvals.policy.seed import policy_seed
from approvals.roles import AUDITOR, POLICY_ADMIN, REVIEWER
from orchestration.demo.seed import demo_data_seed
from orchestration.ledger.chain import ledger_verify
from orchestration.ledger.models import AuditRecord
from orchestration.registry.models import Agent, Tool

pytestmark = pytest.mark.django_db

HTMX = {"HTTP_HX_REQUEST": "true"}
LARGE_REFUNDS = "Large refunds need finance"
LARGE_REFUNDS_CONDITION = "totals.target.sum.amount > 500.0 || totals.run.sum.amount > 500.0"


@pytest.fixture
def policy():
    demo_data_seed()
    policy_seed()


def user_with(role: str | None, name: str | None = None, **flags):
    user = get_user_model().objects.create_user(name or f"user-{role or 'none'}", **flags)
    if role:
        user.groups.add(Group.objects.get(name=role))
    return user


@pytest.fixture
def admin(client, policy):
    user = user_with(POLICY_ADMIN, "pola")
    client.force_login(user)
    return user


def page_urls() -> list[str]:
    rule = Rule.objects.get(name=LARGE_REFUNDS)
    return [
        "/policy/rules/",
        "/policy/rules/new/",
        f"/policy/rules/{rule.pk}/",
        "/policy/factors/",
        "/policy/factors/new/",
        f"/policy/factors/{ArgumentFactor.objects.first().pk}/",
        "/policy/thresholds/",
        "/policy/tools/",
        f"/policy/tools/{Tool.objects.get(name='payments.refund').pk}/",
        "/policy/agents/",
        f"/policy/agents/{Agent.objects.get(name='refund-bot').pk}/",
        "/policy/versions/",
    ]


def rule_data(rule: Rule | None = None, **changes) -> dict:
    """The rule form's POST data: the rule's current values, with ``changes``."""
    data = {
        "name": "",
        "description": "",
        "enabled": "on",
        "mode": "enforce",
        "priority": "100",
        "tool_patterns": "",
        "condition": "",
        "outcome": "ask",
        "team": "",
        "quorum": "1",
        "deadline_minutes": "60",
        "on_expiry": "deny",
        "escalation_team": "",
        "message": "",
    }
    if rule:
        data.update(
            {
                field: str(getattr(rule, field))
                for field in data
                if field not in ("enabled", "tool_patterns")
            }
        )
        data["tool_patterns"] = ", ".join(rule.tool_patterns)
        data["agents"], data["workflows"] = rule.agents, rule.workflows
        if not rule.enabled:
            del data["enabled"]
        if rule.allow_similar:
            data["allow_similar"] = "on"
    data.update(changes)
    return data


def verbs(verb: str) -> list[dict]:
    return [json.loads(r.payload) for r in AuditRecord.objects.filter(verb=verb).order_by("seq")]


# --- access -------------------------------------------------------------------------------


def test_anonymous_users_go_to_login_and_other_roles_get_403(client, policy):
    for url in page_urls():
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith("/login/"), url
    for role in (REVIEWER, AUDITOR, None):
        client.force_login(user_with(role))
        for url in page_urls():
            assert client.get(url).status_code == 403, (role, url)
        assert client.post("/policy/conditions/check/", {"condition": "true"}).status_code == 403
        assert client.post("/policy/versions/publish/", {"note": "x"}).status_code == 403
    assert PolicyVersion.objects.count() == 1


def test_every_page_renders_for_a_policy_admin(client, admin):
    for url in page_urls():
        response = client.get(url)
        assert response.status_code == 200, url
        html = response.content.decode()
        assert 'aria-label="Policy"' in html, url  # the section's tabs
        assert 'href="/policy/rules/" aria-current="page"' in html, url  # Policy in the main nav
    html = client.get("/policy/tools/").content.decode()
    assert "payments.refund" in html
    html = client.get("/policy/agents/").content.decode()
    assert "refund-bot" in html


def test_the_rules_list_counts_hits_and_shows_evaluation_errors(client, admin):
    def evaluation(rules=(), shadow=(), age=timedelta(0)):
        row = PolicyEvaluation.objects.create(
            run_id=1,
            step_seq=1,
            tool="payments.refund",
            action_hash="h",
            policy_version=1,
            outcome="ask",
            score=40,
            rules=list(rules),
            shadow_rules=list(shadow),
            input={},
        )
        PolicyEvaluation.objects.filter(pk=row.pk).update(created_at=timezone.now() - age)

    evaluation([LARGE_REFUNDS])
    evaluation([LARGE_REFUNDS, "Secrets never leave"], age=timedelta(hours=30))
    evaluation([LARGE_REFUNDS], age=timedelta(days=8))  # outside both windows
    evaluation(shadow=["Watch expensive bookings"], age=timedelta(hours=2))
    Rule.objects.filter(name="Secrets never leave").update(
        last_error="no such key 'labels'", last_error_at=timezone.now()
    )

    html = client.get("/policy/rules/").content.decode()

    def hits(name: str) -> tuple[str, str]:
        rule = Rule.objects.get(name=name)
        row = re.search(rf'<tr id="rule-{rule.pk}".*?</tr>', html, re.S)[0]
        return tuple(re.findall(r'<td class="num">(\d+)</td>', row)[1:])

    assert hits(LARGE_REFUNDS) == ("1", "2")
    assert hits("Secrets never leave") == ("0", "1")
    assert hits("Watch expensive bookings") == ("1", "1")
    assert hits("Small refunds within policy") == ("0", "0")
    assert "1 rule failed at evaluation" in html
    assert "⚠ error" in html
    assert "Last evaluation error" in html and "no such key &#x27;labels&#x27;" in html


# --- live condition check -----------------------------------------------------------------


def test_the_condition_check_answers_ok_or_points_at_the_problem(client, admin):
    check = "/policy/conditions/check/"
    ok = client.post(check, {"condition": "args.amount > 500.0", "tool_patterns": "payments.*"})
    assert ok.status_code == 200
    assert "Valid for the tools in scope" in ok.content.decode()

    typo = client.post(check, {"condition": "args.amout > 500.0", "tool_patterns": "payments.*"})
    assert typo.status_code == 422
    html = typo.content.decode()
    assert "did you mean args.amount?" in html
    assert "Line 1, column 6" in html
    assert "args.<mark>amout</mark> &gt; 500.0" in html
    assert '<span class="caret" aria-hidden="true">     ^~~~~</span>' in html

    # the same condition is fine for a tool that has the argument, and not for one that lacks it
    scope = {"condition": "args.to.endsWith('@x.example')"}
    assert client.post(check, {**scope, "tool_patterns": "email.send"}).status_code == 200
    assert client.post(check, {**scope, "tool_patterns": "payments.refund"}).status_code == 422

    multiline = client.post(
        check, {"condition": 'args.amount > 1.0 &&\n  agnet.autonomy == "trusted"'}
    )
    assert multiline.status_code == 422
    html = multiline.content.decode()
    assert "Line 2, column 3" in html and "did you mean agent?" in html
    assert "  <mark>agnet</mark>.autonomy" in html

    unfinished = client.post(check, {"condition": "args.amount >", "tool_patterns": "payments.*"})
    assert unfinished.status_code == 422
    assert "<mark> </mark>" in unfinished.content.decode()  # the end of the input

    bad_scope = client.post(check, {"condition": "true", "tool_patterns": "payments.refnd"})
    assert bad_scope.status_code == 200
    assert "matches no tool (did you mean payments.refund?)" in bad_scope.content.decode()

    # a grant's condition is optional
    empty = client.post(check, {"condition": "", "tool_pattern": "travel.*", "optional": "1"})
    assert empty.status_code == 200
    assert client.post(check, {"condition": ""}).status_code == 422


# --- rules: the draft, not the published policy ---------------------------------------------


def test_saving_a_rule_with_a_bad_condition_changes_nothing(client, admin):
    rule = Rule.objects.get(name=LARGE_REFUNDS)
    before = AuditRecord.objects.count()
    response = client.post(
        f"/policy/rules/{rule.pk}/", rule_data(rule, condition="args.amout > 900.0"), **HTMX
    )
    assert response.status_code == 422
    html = response.content.decode()
    assert html.lstrip().startswith('<form id="rule-form"')  # the form's partial, for htmx
    assert "The rule was not saved" in html
    assert "args.<mark>amout</mark> &gt; 900.0" in html
    assert "did you mean args.amount?" in html
    assert 'aria-invalid="true"' in html
    rule.refresh_from_db()
    assert rule.condition == LARGE_REFUNDS_CONDITION
    assert AuditRecord.objects.count() == before


def test_a_saved_rule_changes_the_draft_until_it_is_published(client, admin):
    rule = Rule.objects.get(name=LARGE_REFUNDS)
    response = client.post(
        f"/policy/rules/{rule.pk}/",
        rule_data(rule, condition="args.amount > 800.0", quorum="2"),
        **HTMX,
    )
    assert response.status_code == 200
    assert response["HX-Redirect"] == "/policy/rules/"
    rule.refresh_from_db()
    assert (rule.condition, rule.quorum) == ("args.amount > 800.0", 2)
    [record] = verbs("policy.draft_changed")
    assert record["kind"] == "rule" and record["change"] == "updated"
    assert record["changes"] == {
        "condition": [LARGE_REFUNDS_CONDITION, "args.amount > 800.0"],
        "quorum": [1, 2],
    }
    assert AuditRecord.objects.get(verb="policy.draft_changed").actor == "pola"

    # the published policy is unchanged; the versions page shows the difference
    latest = PolicyVersion.objects.get()
    published = next(r for r in latest.snapshot["rules"] if r["name"] == LARGE_REFUNDS)
    assert published["condition"] == LARGE_REFUNDS_CONDITION
    html = client.get("/policy/versions/").content.decode()
    assert "draft changed" in html
    assert '<span class="diff-remove">' in html and '<span class="diff-add">' in html
    assert "+rule Large refunds need finance:" in html
    assert "Publish as v2" in html

    response = client.post("/policy/versions/publish/", {"note": "Raise the bar to 800."})
    assert response.status_code == 302
    version = PolicyVersion.objects.get(number=2)
    assert version.note == "Raise the bar to 800." and version.published_by == admin
    assert "args.amount > 800.0" in version.diff
    published = next(r for r in version.snapshot["rules"] if r["name"] == LARGE_REFUNDS)
    assert published["obligations"]["quorum"] == 2
    [record] = verbs("policy.published")[-1:]
    assert record["version"] == 2 and record["note"] == "Raise the bar to 800."
    html = client.get("/policy/versions/").content.decode()
    assert "Published policy version 2" in html
    assert "The draft is the same as the published policy" in html
    assert ledger_verify().ok


def test_a_new_rule_and_a_deleted_one(client, admin):
    data = rule_data(
        name="Bookings abroad",
        tool_patterns="travel.book",
        agents=["travel-agent"],
        condition="args.nights > 10",
        outcome="deny",
        priority="40",
    )
    response = client.post("/policy/rules/new/", data)
    assert response.status_code == 302, response.content.decode()[:3000]
    rule = Rule.objects.get(name="Bookings abroad")
    assert rule.agents == ["travel-agent"] and rule.tool_patterns == ["travel.book"]
    assert verbs("policy.draft_changed")[-1]["change"] == "created"

    duplicate = client.post("/policy/rules/new/", data)
    assert duplicate.status_code == 422
    assert "Rule with this Name already exists." in duplicate.content.decode()

    unknown = client.post("/policy/rules/new/", {**data, "name": "x", "tool_patterns": "travl.*"})
    assert unknown.status_code == 422
    assert "matches no tool" in unknown.content.decode()

    response = client.post(f"/policy/rules/{rule.pk}/delete/")
    assert response.status_code == 302
    assert not Rule.objects.filter(name="Bookings abroad").exists()
    assert verbs("policy.draft_changed")[-1] == {
        "kind": "rule",
        "name": "Bookings abroad",
        "change": "deleted",
    }


def test_publishing_refuses_a_bad_draft_and_an_unchanged_one(client, admin):
    response = client.post("/policy/versions/publish/", {"note": ""}, **HTMX)
    assert response.status_code == 422
    assert "The draft is the same as the published policy." in response.content.decode()

    # a condition that no longer fits (written around the services, as a schema change would)
    Rule.objects.filter(name=LARGE_REFUNDS).update(condition="args.amount > ")
    response = client.post("/policy/versions/publish/", {"note": "x"}, **HTMX)
    assert response.status_code == 422
    html = response.content.decode()
    assert html.lstrip().startswith('<section id="draft"')
    assert "Not published." in html and f"rule {LARGE_REFUNDS}: Syntax error" in html
    assert PolicyVersion.objects.count() == 1
    assert not verbs("policy.published")[1:]


def test_the_simulation_fragment(client, admin):
    Rule.objects.filter(name="Small refunds within policy").update(condition="args.amount <= 50.0")
    response = client.get("/policy/versions/simulation/", **HTMX)
    assert response.status_code == 200
    html = response.content.decode()
    assert html.lstrip().startswith('<div id="simulation"')
    assert "asks/day" in html
    html = client.get("/policy/versions/").content.decode()
    assert "What would this draft do?" in html

    Rule.objects.filter(name=LARGE_REFUNDS).update(condition="args.amout > 1.0")
    response = client.get("/policy/versions/simulation/", **HTMX)
    assert response.status_code == 422
    assert "The draft cannot be simulated" in response.content.decode()


# --- argument factors ---------------------------------------------------------------------


def test_factors_are_validated_and_saved_to_the_draft(client, admin):
    data = {
        "name": "Many nights",
        "tool_patterns": "travel.book",
        "condition": "args.nigths > 7",
        "points": "15",
        "enabled": "on",
    }
    response = client.post("/policy/factors/new/", data)
    assert response.status_code == 422
    assert "args.<mark>nigths</mark>" in response.content.decode()
    assert client.post("/policy/factors/new/", {**data, "points": "101"}).status_code == 422

    response = client.post("/policy/factors/new/", {**data, "condition": "args.nights > 7"})
    assert response.status_code == 302
    factor = ArgumentFactor.objects.get(name="Many nights")
    assert (factor.points, factor.tool_patterns) == (15, ["travel.book"])
    assert verbs("policy.draft_changed")[-1]["kind"] == "factor"


# --- thresholds ---------------------------------------------------------------------------


def thresholds_data(**changes) -> dict:
    data = {}
    for t in AutonomyThreshold.objects.all():
        data[f"{t.autonomy}-allow_below"] = t.allow_below
        data[f"{t.autonomy}-quorum2_above"] = t.quorum2_above
        data[f"{t.autonomy}-deny_above"] = t.deny_above
    return {**data, **changes}


def test_thresholds_are_validated_field_by_field(client, admin):
    response = client.post(
        "/policy/thresholds/",
        thresholds_data(
            **{
                "supervised-allow_below": "75",  # above Q (70)
                "guarded-quorum2_above": "96",  # above D (95)
                "trusted-deny_above": "101",
            }
        ),
    )
    assert response.status_code == 422
    html = response.content.decode()
    assert re.search(
        r'id="id_supervised-allow_below_error">Must not be above “quorum 2 above” \(70\)', html
    )
    assert re.search(
        r'id="id_guarded-quorum2_above_error">Must not be above “deny above” \(95\)', html
    )
    assert re.search(r'id="id_trusted-deny_above_error">Ensure this value is less than or', html)
    assert AutonomyThreshold.objects.get(autonomy="supervised").allow_below == 35
    assert not verbs("policy.draft_changed")

    response = client.post("/policy/thresholds/", thresholds_data(**{"trusted-allow_below": "60"}))
    assert response.status_code == 302
    assert AutonomyThreshold.objects.get(autonomy="trusted").allow_below == 60
    assert verbs("policy.draft_changed") == [
        {
            "kind": "thresholds",
            "change": "updated",
            "changes": {"trusted": {"allow_below": [65, 60]}},
        }
    ]


# --- tools --------------------------------------------------------------------------------


def test_tool_risk_is_edited_through_the_service(client, admin):
    tool = Tool.objects.get(name="email.send")
    data = {
        "side_effect": "external_send",
        "impact": "3",
        "compensating_tool": "",
        "labels_read": "",
        "labels_produced": "pii, outbound",
        "cost_per_call": "0.01",
    }
    bad = client.post(
        f"/policy/tools/{tool.pk}/", {**data, "impact": "5", "compensating_tool": "x"}
    )
    assert bad.status_code == 422
    assert "There is no tool named x" in bad.content.decode()
    response = client.post(f"/policy/tools/{tool.pk}/", data)
    assert response.status_code == 302
    tool.refresh_from_db()
    assert (tool.impact, tool.reversible, tool.risk_overridden) == (3, False, True)
    assert tool.labels_produced == ["pii", "outbound"]
    assert verbs("tool.risk_changed")[-1]["tool"] == "email.send"
    assert "edited by an admin" in client.get("/policy/tools/").content.decode()


# --- agents and grants --------------------------------------------------------------------


def test_an_agents_autonomy_change_is_ledgered(client, admin):
    agent = Agent.objects.get(name="refund-bot")
    response = client.post(
        f"/policy/agents/{agent.pk}/", {"autonomy": "trusted", "status": "active"}
    )
    assert response.status_code == 302
    agent.refresh_from_db()
    assert agent.autonomy == "trusted"
    record = AuditRecord.objects.get(verb="agent.autonomy_changed")
    assert json.loads(record.payload)["changes"] == {"autonomy": "trusted"}
    assert record.actor == "pola"

    bad = client.post(f"/policy/agents/{agent.pk}/", {"autonomy": "godlike", "status": "active"})
    assert bad.status_code == 422


def test_grants_are_added_with_a_checked_condition_and_revoked_in_one_click(client, admin):
    agent = Agent.objects.get(name="travel-agent")
    url = f"/policy/agents/{agent.pk}/grants/"
    bad = client.post(url, {"tool_pattern": "payments.refund", "condition": "args.amont < 50.0"})
    assert bad.status_code == 422
    assert "args.<mark>amont</mark>" in bad.content.decode()
    past = client.post(url, {"tool_pattern": "payments.refund", "expires_at": "2001-01-01T10:00"})
    assert past.status_code == 422 and "Must be in the future." in past.content.decode()
    assert not Grant.objects.filter(agent=agent, tool_pattern="payments.refund").exists()

    expires = (timezone.now() + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M")
    response = client.post(
        url,
        {
            "tool_pattern": "payments.refund",
            "condition": "args.amount < 50.0",
            "expires_at": expires,
        },
    )
    assert response.status_code == 302
    grant = Grant.objects.get(agent=agent, tool_pattern="payments.refund")
    assert grant.condition == "args.amount < 50.0" and grant.expires_at > timezone.now()
    assert verbs("grant.created")[-1]["tool_pattern"] == "payments.refund"
    html = client.get(f"/policy/agents/{agent.pk}/").content.decode()
    assert f'action="/policy/grants/{grant.pk}/revoke/"' in html

    response = client.post(f"/policy/grants/{grant.pk}/revoke/", **HTMX)
    assert response.status_code == 200
    html = response.content.decode()
    assert html.lstrip().startswith('<section id="grants"')
    assert "Revoked:" in html and f'id="grant-{grant.pk}"' not in html
    grant.refresh_from_db()
    assert grant.revoked_at and grant.revoked_by == "pola"
    assert AuditRecord.objects.filter(verb="grant.revoked", object_id=str(grant.pk)).exists()
    again = client.post(f"/policy/grants/{grant.pk}/revoke/")
    assert again.status_code == 302  # already revoked: said so on the agent's page
    assert "already revoked" in client.get(again["Location"]).content.decode()


# --- Django's admin -----------------------------------------------------------------------


def test_djangos_admin_shows_policy_read_only(client, policy):
    client.force_login(user_with(None, "root", is_staff=True, is_superuser=True))
    rule = Rule.objects.get(name=LARGE_REFUNDS)
    objects = {
        "approvals/rule": rule,
        "approvals/argumentfactor": ArgumentFactor.objects.first(),
        "approvals/autonomythreshold": AutonomyThreshold.objects.first(),
        "approvals/policyversion": PolicyVersion.objects.first(),
        "approvals/grant": Grant.objects.first(),
        "orchestration/tool": Tool.objects.first(),
    }
    for model, obj in objects.items():
        assert client.get(f"/admin/{model}/").status_code == 200, model
        assert client.get(f"/admin/{model}/{obj.pk}/change/").status_code == 200, model
        response = client.post(f"/admin/{model}/{obj.pk}/change/", {"name": "changed"})
        assert response.status_code == 403, model
        assert client.get(f"/admin/{model}/add/").status_code == 403, model
        assert client.post(f"/admin/{model}/{obj.pk}/delete/", {"post": "yes"}).status_code == 403
    for model in ("policyevaluation", "approvalrequest", "decision"):
        assert client.get(f"/admin/approvals/{model}/").status_code == 200, model
        assert client.get(f"/admin/approvals/{model}/add/").status_code == 403, model
    rule.refresh_from_db()
    assert rule.name == LARGE_REFUNDS
