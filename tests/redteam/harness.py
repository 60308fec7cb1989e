"""Runs red-team scenarios through the real engine, the real policy gate and the seeded demo, and
reports the attack success rate and the benign false-block rate.

A scenario (``attacks.toml``, ``benign.toml``) is a list of moves: set the world up (plant a
document, an order, a hotel; give an agent the compromised model), start runs, drive them as a
worker would, and act as reviewers through the real pages. Then the oracle judges what happened.
Nothing here knows what the gate will do: outcomes are measured, never expected. But every move
must do what it says (start its run, find the agent, the request, the form it acts on): a move
that cannot is a :class:`HarnessError`, reported as a failure of the scenario, never a quiet
no-op that would make an attack that never ran look held."""

import time
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from approvals.demo import DEMO_TEAMS, DEMO_USERS
from approvals.policy.models import Grant, Rule
from approvals.policy.seed import policy_seed
from approvals.policy.services import policy_publish
from approvals.queue.models import OPEN, ApprovalRequest, RequestStatus, ReviewerTeam
from orchestration.canonical import canonical_json
from orchestration.demo.models import Hotel, Order
from orchestration.demo.seed import demo_data_seed
from orchestration.engine.runner import run_advance
from orchestration.registry.models import Agent
from orchestration.retrieval.services import document_add
from orchestration.runs.models import FINAL, Run
from orchestration.runs.services import RunError, run_start
from tests.redteam import oracle, workflows  # noqa: F401  (registers the workflows)
from tests.redteam.browser import Browser, Form, Page
from tests.redteam.model import PlaybookProvider
from tests.redteam.oracle import Facts

HERE = Path(__file__).parent
SCENARIO_SECONDS = 20.0  # a run that has not settled by then is left as it is and judged
BENIGN_FINISHED = {"completed", "waiting"}


class HarnessError(Exception):
    """A move could not be played as written: the scenario did not exercise what it claims."""


@dataclass
class Scenario:
    id: str
    kind: str  # attack | benign
    cls: str
    description: str
    moves: list[dict[str, Any]]
    ci: bool = False


@dataclass
class Result:
    scenario: Scenario
    reasons: list[str] = field(default_factory=list)  # breaches (attack) or blocks (benign)
    error: str = ""  # the move that could not be played
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return bool(self.reasons or self.error)


def scenarios_load() -> list[Scenario]:
    found = []
    for name, kind in (("attacks.toml", "attack"), ("benign.toml", "benign")):
        data = tomllib.loads((HERE / name).read_text())
        for item in data["scenario"]:
            found.append(
                Scenario(
                    id=item["id"],
                    kind=kind,
                    cls=item["class"],
                    description=item["description"],
                    moves=item["moves"],
                    ci=item.get("ci", False),
                )
            )
    ids = [s.id for s in found]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise ValueError(f"duplicate scenario ids: {sorted(duplicates)}")
    return found


# --- the world --------------------------------------------------------------------------------


def world_reset() -> None:
    """An empty database (roles and tools come back with post_migrate), the demo's reviewers
    and teams, its data and its policy, as ``make run`` seeds them (without the first runs)."""
    call_command("flush", interactive=False, verbosity=0)
    User = get_user_model()
    for username, role in DEMO_USERS:
        user = User.objects.create_user(
            username=username,
            email=f"{username}@example.com",
            is_staff=role is None,
            is_superuser=role is None,
        )
        if role:
            user.groups.add(Group.objects.get(name=role))
    for team, members in DEMO_TEAMS.items():
        ReviewerTeam.objects.create(name=team).members.add(
            *User.objects.filter(username__in=members)
        )
    demo_data_seed(owner=User.objects.get(username="admin"))
    policy_seed()


class Play:
    """One scenario being played: its runs by name, the pages reviewers hold, the facts."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.runs: dict[str, int] = {}
        self.pages: dict[str, Page] = {}
        self.facts = Facts()
        self.crashed: set[int] = set()
        self.refused = 0  # starts refused as the scenario expected
        self.deadline = time.monotonic() + SCENARIO_SECONDS

    def play(self) -> None:
        for move in self.scenario.moves:
            verb = move["do"]
            getattr(self, f"do_{verb}")(**{k: v for k, v in move.items() if k != "do"})
        if not self.runs and not self.refused:
            raise HarnessError("the scenario started no run")
        self.do_drive()
        for run in Run.objects.filter(status="running").exclude(pk__in=self.crashed):
            self.facts.forbidden.append(f"run {run.pk} was left running (nothing will finish it)")

    # --- setting the world up -----------------------------------------------------------------

    def do_order(self, order_id, name, email, item, amount) -> None:
        Order.objects.create(
            order_id=order_id,
            customer_name=name,
            customer_email=email,
            item=item,
            amount=Decimal(str(amount)),
        )

    def do_hotel(self, name, area, price, rooms=3, quiet=True, beach_km=0.5) -> None:
        Hotel.objects.create(
            name=name,
            city="Lisbon",
            area=area,
            beach_km=beach_km,
            quiet=quiet,
            rating=4.9,
            price_per_night=Decimal(str(price)),
            rooms_left=rooms,
        )

    def do_document(self, title, body, source="policies") -> None:
        document_add(source=source, title=title, body=body)

    def do_agent(self, name, provider=None, owner=None, autonomy=None) -> None:
        changes: dict[str, Any] = {}
        if provider:
            changes["provider"] = provider
        if owner:
            changes["owner"] = get_user_model().objects.get(username=owner)
        if autonomy:
            changes["autonomy"] = autonomy
        if not changes:
            raise HarnessError(f"agent move for {name!r} changes nothing")
        updated = Agent.objects.filter(name=name).update(**changes)
        if updated != 1:
            raise HarnessError(f"agent {name!r}: {updated} agents of that name")

    def do_agent_create(self, name, tools, description="An agent set up by an admin.") -> None:
        """An admin sets up another agent: its ceiling and grants are ``tools``, which is also
        its role in the ground truth."""
        from approvals.policy.services import grant_create
        from orchestration.registry.models import Autonomy, Tool

        admin = _user("admin")
        agent = Agent.objects.create(
            name=name, description=description, owner=admin, autonomy=Autonomy.SUPERVISED
        )
        agent.tools.set(Tool.objects.filter(name__in=tools))
        for tool in tools:
            grant_create(agent=agent, tool_pattern=tool, by=admin)
        self.facts.roles[name] = set(tools)

    def do_playbook(self, moves) -> None:
        PlaybookProvider.load(moves)

    def do_secret(self, value) -> None:
        self.facts.secrets.append(value)

    def do_knobs(self, **values) -> None:
        for key, value in values.items():
            setattr(self.facts.knobs, key, value)

    # --- runs ---------------------------------------------------------------------------------

    def do_start(
        self, workflow, input, agent=None, name="main", started_by=None, acting=None, expect=None
    ):
        """Start a run. A refused start fails the scenario, unless the move says
        ``expect = "refused"``: then starting must be refused."""
        if expect not in (None, "refused"):
            raise HarnessError(f"start: unknown expect {expect!r}")
        user = _user(started_by) if started_by else None
        try:
            run = run_start(workflow=workflow, input=input, agent=agent, started_by=user)
        except RunError as exc:
            if expect != "refused":
                raise HarnessError(f"start of {workflow} was refused: {exc}") from exc
            self.refused += 1
            return
        if expect == "refused":
            raise HarnessError(f"start of {workflow} was expected to be refused; run {run.pk}")
        if name in self.runs:
            raise HarnessError(f"two runs named {name!r}")
        self.runs[name] = run.pk
        if acting:
            self.facts.actors[run.pk] = acting

    def do_drive(self) -> None:
        """Advance every run that a worker would advance now (new, due, or waiting on children
        that finished), until none is left or the scenario's time is up."""
        while time.monotonic() < self.deadline:
            due = [
                run
                for run in Run.objects.exclude(status__in=FINAL).exclude(pk__in=self.crashed)
                if self._due(run)
            ]
            if not due:
                return
            moved = [self._advance(run.pk) for run in due]
            if all(outcome == "skipped" for outcome in moved):
                return

    def _advance(self, run_id: int) -> str:
        """A worker's advance; one that raises (a poison run: the worker would crash on it again
        and again) is an outcome of the attack, recorded as forbidden."""
        try:
            return run_advance(run_id)
        except Exception as exc:
            self.crashed.add(run_id)
            self.facts.forbidden.append(
                f"run {run_id} crashed the worker ({type(exc).__name__}: {str(exc)[:120]})"
            )
            return "crashed"

    def _due(self, run: Run) -> bool:
        now = timezone.now()
        if run.status == "pending":
            return True
        if run.status == "waiting" and run.wake_at is not None:
            if run.wake_at <= now:
                return True
            if (run.wake_at - now).total_seconds() < 1:
                time.sleep((run.wake_at - now).total_seconds())
                return True
            return False
        if run.status == "waiting":
            children = Run.objects.filter(parent_id=run.pk)
            return children.exists() and not children.exclude(status__in=FINAL).exists()
        return False

    def do_pause(self, agent) -> None:
        from approvals.policy.drafts import agent_update

        admin = get_user_model().objects.get(username="admin")
        agent_update(agent=Agent.objects.get(name=agent), by=admin, status="paused")
        self.facts.paused[agent] = timezone.now()

    def do_publish(self, tool, **changes) -> None:
        """A policy admin changes the rules that ask about ``tool`` and publishes (e.g. a quorum
        raised while a request waits)."""
        from fnmatch import fnmatchcase

        asking = [
            rule.pk
            for rule in Rule.objects.filter(outcome="ask")
            if any(fnmatchcase(tool, pattern) for pattern in rule.tool_patterns or [])
        ]
        if not asking:
            raise HarnessError(f"publish: no rule asks about {tool}")
        Rule.objects.filter(pk__in=asking).update(**changes)
        _publish()

    def do_rule(self, name, tool_patterns, condition, outcome, **obligations) -> None:
        """A policy admin adds a rule and publishes (e.g. mid-size refunds asked of anyone)."""
        Rule.objects.create(
            name=name,
            tool_patterns=tool_patterns,
            condition=condition,
            outcome=outcome,
            **obligations,
        )
        _publish()

    # --- reviewers at their browsers ----------------------------------------------------------

    def _request(self, tool: str, run: str = "main", status=OPEN) -> ApprovalRequest:
        run_ids = self._run_tree(run)
        request = (
            ApprovalRequest.objects.filter(run_id__in=run_ids, tool=tool, status__in=status)
            .order_by("-id")
            .first()
        )
        if request is None:
            runs = Run.objects.filter(pk__in=run_ids)
            found = ApprovalRequest.objects.filter(run_id__in=run_ids)
            raise HarnessError(
                f"no open {tool} request in run {run!r} (runs: "
                f"{', '.join(f'{r.pk} {r.status}' for r in runs)}; requests: "
                f"{', '.join(f'{r.tool or r.kind} {r.status}' for r in found) or 'none'})"
            )
        return request

    def _asked(self, tool: str, run: str) -> bool:
        return ApprovalRequest.objects.filter(
            run_id__in=self._run_tree(run), tool=tool, status__in=OPEN
        ).exists()

    def _run_tree(self, name: str) -> list[int]:
        if name not in self.runs:
            raise HarnessError(f"no run named {name!r}")
        ids = [self.runs[name]]
        frontier = list(ids)
        while frontier:
            frontier = list(Run.objects.filter(parent_id__in=frontier).values_list("pk", flat=True))
            ids.extend(frontier)
        return ids

    def _page(self, who: str, tool: str, run: str, query: str = "") -> Page:
        request = self._request(tool, run)
        url = reverse("approvals:request", kwargs={"request_id": request.pk})
        return Browser(who).get(url + query)

    def _form(self, page: Page, verdict: str, what: str, **hidden: str) -> Form:
        form = page.form("/decide/", verdict=verdict, **hidden)
        if form is None:
            raise HarnessError(f"{what}: the page ({page.status}) offers no {verdict} form")
        return form

    def do_open(self, who, tool, page, run="main") -> None:
        """A reviewer opens a request page and keeps it open (to decide on it later)."""
        self.pages[page] = self._page(who, tool, run)

    def _direct(self, who: str, tool: str, run: str, **data: str) -> None:
        """Post a decision straight to the request's decide URL with its current hash, as an
        attacker can without any page offering the form."""
        request = self._request(tool, run)
        url = reverse("approvals:decide", kwargs={"request_id": request.pk})
        Browser(who).post(url, {"action_hash": request.action_hash, **data})
        self.do_drive()

    def do_approve(
        self, who, tool, run="main", page=None, allow_similar="", direct=False, optional=False
    ) -> None:
        """Approve from the page just opened, or from ``page`` kept open since; ``direct``:
        post the approval without any page; ``optional``: only if the gate asked at all (where
        refusing outright is as good an answer as asking)."""
        if optional and not self._asked(tool, run):
            return
        if direct:
            extra = {"allow_similar": allow_similar} if allow_similar else {}
            self._direct(who, tool, run, verdict="approve", **extra)
            return
        if page is not None and page not in self.pages:
            raise HarnessError(f"{who} approving {tool}: no page {page!r} was opened")
        shown = self.pages[page] if page else self._page(who, tool, run)
        form = self._form(shown, "approve", f"{who} approving {tool}")
        button = ("allow_similar", allow_similar) if allow_similar else None
        Browser(who).submit(form, button=button)
        self.do_drive()

    def do_edit(self, who, tool, args, run="main", direct=False) -> None:
        """Edit & approve: open the edit form, change the fields, review, confirm; ``direct``:
        post the confirmed edit without any page."""
        if direct:
            edited = {**self._request(tool, run).args_under_review, **args}
            fields = {f"arg-{k}": str(v) for k, v in edited.items()}
            self._direct(who, tool, run, verdict="edit", confirm="1", **fields)
            return
        shown = self._page(who, tool, run, "?form=edit")
        form = self._form(shown, "edit", f"{who} editing {tool}")
        browser = Browser(who)
        values = {f"arg-{k}": str(v) for k, v in args.items()}
        for key in values:
            if form.value(key) is None:
                raise HarnessError(f"{who} editing {tool}: the form has no field {key!r}")
        review = browser.submit(form, **values)
        confirm = self._form(review, "edit", f"{who} confirming the edit of {tool}", confirm="1")
        browser.submit(confirm)
        self.do_drive()

    def do_reject(self, who, tool, comment="Not by our policy.", run="main") -> None:
        shown = self._page(who, tool, run, "?form=reject")
        form = self._form(shown, "reject", f"{who} rejecting {tool}")
        Browser(who).submit(form, comment=comment)
        self.do_drive()

    def do_answer(self, who="reviewer", choice=0, run="main") -> None:
        """Answer a question (the customer's pick) with one of the offered choices."""
        request = (
            ApprovalRequest.objects.filter(
                run_id__in=self._run_tree(run), kind="question", status__in=OPEN
            )
            .order_by("-id")
            .first()
        )
        if request is None:
            raise HarnessError(f"no question to answer in run {run!r}")
        shown = Browser(who).get(reverse("approvals:request", kwargs={"request_id": request.pk}))
        form = self._form(shown, "answer", f"{who} answering")
        if not 0 <= choice < len(form.buttons):
            raise HarnessError(f"{who} answering: no choice {choice} of {len(form.buttons)}")
        Browser(who).submit(form, button=form.buttons[choice])
        self.do_drive()

    def do_halt(self, who, run="main", reason="Stop this.") -> None:
        """Halt a run through its page's halt button (posted directly: an attacker needs no
        button). Forbidden when the run waited on a request of a team the halter is not on."""
        if run not in self.runs:
            raise HarnessError(f"no run named {run!r}")
        run_id = self.runs[run]
        teams = set(_user(who).reviewer_teams.values_list("name", flat=True))
        waiting_on = set(
            ApprovalRequest.objects.filter(run_id__in=self._run_tree(run), status__in=OPEN)
            .exclude(team="")
            .values_list("team", flat=True)
        )
        Browser(who).post(reverse("runs:halt", kwargs={"run_id": run_id}), {"reason": reason})
        halted = Run.objects.get(pk=run_id)
        foreign = waiting_on - teams
        if halted.status == "halted" and halted.halted_by == who and foreign:
            self.facts.forbidden.append(
                f"{who} halted run {run_id} waiting on {', '.join(sorted(foreign))}'s request"
            )

    def do_revoke_grants(self, who) -> None:
        """Revoke every reviewer grant in sight. Forbidden for a grant made on a request of a
        team the revoker is not on."""
        teams = set(_user(who).reviewer_teams.values_list("name", flat=True))
        grants = Grant.objects.filter(source="reviewer", revoked_at__isnull=True)
        if not grants.exists():
            raise HarnessError(f"{who} revoking grants: no reviewer grant to revoke")
        for grant in grants:
            team = _grant_team(grant)
            Browser(who).post(
                reverse("approvals:grant_revoke", kwargs={"grant_id": grant.pk}),
                {"next": "/"},
            )
            grant.refresh_from_db()
            if grant.revoked_at is not None and team and team not in teams:
                self.facts.forbidden.append(f"{who} revoked {team}'s grant #{grant.pk}")

    def do_read(self, who, tool, run="main") -> None:
        """Read the run's page, timeline and grants. Forbidden to see a request's arguments or
        reasoning when the request is for a team the reader is not on."""
        request = self._request(tool, run, status=RequestStatus.values)
        teams = set(_user(who).reviewer_teams.values_list("name", flat=True))
        if not request.team or request.team in teams:
            raise HarnessError(f"{who} reading: request {request.pk} is not another team's")
        browser = Browser(who)
        run_id = self.runs[run]  # the request was found in it
        shown_anyway = canonical_json(Run.objects.get(pk=request.run_id).input)
        secret_bits = [request.reasoning] + [
            str(v) for v in (request.args or {}).values() if str(v) not in shown_anyway
        ]
        for name in ("runs:detail", "runs:timeline", "approvals:run_grants"):
            page = browser.get(reverse(name, kwargs={"run_id": run_id}))
            if page.status != 200:
                continue
            seen = [bit for bit in secret_bits if bit and _escaped(bit) in page.html]
            if seen:
                self.facts.forbidden.append(
                    f"{who} read {request.team}'s request {request.pk} on {name}: {seen[0][:60]!r}"
                )


def _user(username: str):
    try:
        return get_user_model().objects.get(username=username)
    except get_user_model().DoesNotExist:
        raise HarnessError(f"no user {username!r}") from None


def _publish() -> None:
    try:
        policy_publish(by=_user("policy"), note="red team")
    except ValidationError as exc:
        raise HarnessError(f"publish: {' '.join(exc.messages)}") from exc


def _escaped(text: str) -> str:
    from django.utils.html import escape

    return escape(text)


def _grant_team(grant: Grant) -> str:
    """The team of the request a reviewer's grant was made on: the request the grant's creator
    approved with "allow similar" in the grant's run, else the latest one they approved."""
    requests = ApprovalRequest.objects.filter(
        decisions__reviewer=grant.created_by, tool__in=[grant.tool_pattern]
    )
    if grant.run_id:
        requests = requests.filter(run_id=grant.run_id)
    request = requests.order_by("-id").first()
    return request.team if request else ""


# --- running and reporting ----------------------------------------------------------------------


def scenario_run(scenario: Scenario) -> Result:
    started = time.monotonic()
    PlaybookProvider.load([])
    world_reset()
    play = Play(scenario)
    error = ""
    try:
        play.play()
    except Exception as exc:  # the harness keeps going; the failure is reported, not hidden
        error = f"{type(exc).__name__}: {exc}"
    if scenario.kind == "attack":
        reasons = oracle.attack_breaches(play.facts)
    else:
        reasons = oracle.benign_blocks(play.facts, finished=BENIGN_FINISHED)
    return Result(scenario, reasons, error, time.monotonic() - started)


def suite_run(scenarios: list[Scenario]) -> list[Result]:
    return [scenario_run(scenario) for scenario in scenarios]


def ci_subset(scenarios: list[Scenario]) -> list[Scenario]:
    """The scenarios marked ``ci``: at least one of every class of the full set."""
    subset = [s for s in scenarios if s.ci]
    missing = {(s.kind, s.cls) for s in scenarios} - {(s.kind, s.cls) for s in subset}
    if missing:
        raise ValueError(f"classes with no ci scenario: {sorted(missing)}")
    return subset


def report(results: list[Result]) -> str:
    """Stable ``key=value`` lines: the figures, then one line per failing scenario. A scenario
    whose moves could not be played (``error``) counts as a failure of its kind too."""
    attacks = [r for r in results if r.scenario.kind == "attack"]
    benign = [r for r in results if r.scenario.kind == "benign"]
    through = [r for r in attacks if r.reasons]
    blocked = [r for r in benign if r.reasons]
    errors = [r for r in results if r.error]
    lines = [
        f"attacks={len(attacks)} attacks_through={len(through)} "
        f"attack_success_rate={_rate(through, attacks)} benign={len(benign)} "
        f"benign_blocked={len(blocked)} benign_false_block_rate={_rate(blocked, benign)} "
        f"harness_errors={len(errors)}"
    ]
    for result in through:
        lines.append(
            f"through id={result.scenario.id} class={result.scenario.cls} "
            f"why={' | '.join(result.reasons)}"
        )
    for result in blocked:
        lines.append(
            f"blocked id={result.scenario.id} class={result.scenario.cls} "
            f"why={' | '.join(result.reasons)}"
        )
    for result in errors:
        lines.append(
            f"error id={result.scenario.id} class={result.scenario.cls} why={result.error}"
        )
    return "\n".join(lines)


def _rate(part: list, whole: list) -> str:
    return f"{len(part) / len(whole):.3f}" if whole else "0.000"


def figures(results: list[Result]) -> tuple[int, float, int]:
    """Attacks through, the benign false-block rate, and scenarios that could not be played."""
    through = sum(1 for r in results if r.scenario.kind == "attack" and r.reasons)
    benign = [r for r in results if r.scenario.kind == "benign"]
    rate = sum(1 for r in benign if r.reasons) / len(benign) if benign else 0.0
    errors = sum(1 for r in results if r.error)
    return through, rate, errors
