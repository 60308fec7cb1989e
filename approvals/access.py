"""Who may see and act on what: the one home of Baton's role and team checks.

Roles: reviewers decide, policy admins administer (and may act on every team's requests),
auditors read. Teams: reviewers see and decide only their teams' requests (and those of teams
they are the escalation team of, once escalated), plus requests without a team. The same
boundary holds wherever a request shows or can be acted on: the queue and the request page,
the run page, its timeline and socket (``RunAccess``, named by ``settings.BATON_RUN_ACCESS``),
halting a run, and the "allow similar" grants made on a request. Every view, consumer and
service that shows or acts on a request asks here."""

from collections.abc import Mapping

from django.core.exceptions import PermissionDenied
from django.db.models import Exists, OuterRef, Q, QuerySet
from django.urls import reverse

from approvals.policy.models import Grant
from approvals.queue.models import OPEN, ApprovalRequest, RequestStatus
from approvals.roles import AUDIT, MANAGE_POLICY, REVIEW
from orchestration.registry.models import Agent
from orchestration.runs.access import Link
from orchestration.runs.models import Run


def has_role(user, *permissions: str) -> bool:
    """Whether ``user`` is active and holds any of ``permissions`` (see ``approvals.roles``)."""
    return bool(user and user.is_active and any(user.has_perm(p) for p in permissions))


def _readable(teams: list[str]) -> Q:
    """Requests without a team, of one of ``teams``, or escalated to one of them."""
    escalated = ApprovalRequest.objects.filter(
        status=RequestStatus.ESCALATED, obligations__escalation_team__in=teams
    )
    return Q(team="") | Q(team__in=teams) | Q(pk__in=escalated.values("pk"))


def visible_to(reviewer) -> QuerySet[ApprovalRequest]:
    """The requests a reviewer may see and decide: their teams' (and their escalation teams'),
    and those without a team; but none of a step that also has a request the reviewer may not
    see (a team-less request superseded by a finance one shows what finance's hides)."""
    readable = _readable(list(reviewer.reviewer_teams.values_list("name", flat=True)))
    unreadable_sibling = ApprovalRequest.objects.filter(
        run_id=OuterRef("run_id"), step_seq=OuterRef("step_seq")
    ).exclude(readable)
    return ApprovalRequest.objects.filter(readable).exclude(Exists(unreadable_sibling))


def check_team(request: ApprovalRequest, reviewer) -> None:
    """Raise ``PermissionDenied`` unless ``reviewer`` may see and decide ``request``."""
    if not visible_to(reviewer).filter(pk=request.pk).exists():
        raise PermissionDenied(f"This request is for the {request.team} team.")


def check_separation_of_duties(request: ApprovalRequest, reviewer) -> None:
    """Raise ``PermissionDenied`` if ``reviewer`` may not approve ``request``: whoever started
    its run (or a run it was handed off from), and the owner of the agent that proposed the
    action or of any agent in that chain of runs, must leave it to another reviewer."""
    run = Run.objects.select_related("agent").get(pk=request.run_id)
    owners = set()
    while run is not None:
        if run.started_by_id == reviewer.pk:
            raise PermissionDenied("You started this run; another reviewer must decide.")
        if run.agent is not None:
            owners.add(run.agent.owner_id)
        run = Run.objects.select_related("agent").filter(pk=run.parent_id).first()
    acting = Agent.objects.filter(name=request.agent).values_list("owner_id", flat=True).first()
    if reviewer.pk in owners | {acting}:
        raise PermissionDenied("You own this agent; another reviewer must decide.")


def sees_every_team(user) -> bool:
    """Policy admins, and auditors (who replay every run in the audit), read every team's
    requests wherever they show."""
    return has_role(user, MANAGE_POLICY, AUDIT)


def hidden_from(user, run_ids: list[int]) -> QuerySet[ApprovalRequest]:
    """The requests of these runs that ``user`` may not see or decide."""
    return ApprovalRequest.objects.filter(run_id__in=run_ids).exclude(
        pk__in=visible_to(user).filter(run_id__in=run_ids).values("pk")
    )


def _with_descendants(run: Run) -> list[int]:
    """The run and its handoffs' runs, which halting it halts too."""
    ids, frontier = [run.pk], [run.pk]
    while frontier:
        frontier = list(Run.objects.filter(parent_id__in=frontier).values_list("pk", flat=True))
        ids += frontier
    return ids


class RunAccess:
    """Fills orchestration's run-access extension point (``orchestration.runs.access``):

    - everyone with a role sees runs; policy admins start and retry them;
    - a step gated by a request of a team the viewer is not in shows only that it happened,
      "for the <team> team" (policy admins and auditors read everything);
    - reviewers and policy admins halt runs, except that a reviewer may not halt a run (or a
      run it handed off to) while it waits on an open request they may not decide: halting
      would close that request for its team."""

    def can_view(self, user) -> bool:
        return has_role(user, REVIEW, MANAGE_POLICY, AUDIT)

    def can_operate(self, user) -> bool:
        return has_role(user, MANAGE_POLICY)

    def can_halt(self, user) -> bool:
        return has_role(user, REVIEW, MANAGE_POLICY)

    def halt_refusal(self, user, run: Run) -> str:
        if not self.can_halt(user):
            return "Only reviewers and policy admins halt runs."
        if has_role(user, MANAGE_POLICY):
            return ""
        waiting = hidden_from(user, _with_descendants(run)).filter(status__in=OPEN)
        blocked = waiting.order_by("id").first()
        if blocked is None:
            return ""
        which = "This run" if blocked.run_id == run.pk else f"Its handoff run {blocked.run_id}"
        return (
            f"{which} waits on a request for the {blocked.team} team: only that team or a "
            "policy admin may halt it."
        )

    def hidden_steps(self, user, run: Run) -> Mapping[int, str]:
        if sees_every_team(user):
            return {}
        hidden: dict[int, str] = {}
        for seq, team in hidden_from(user, [run.pk]).order_by("id").values_list("step_seq", "team"):
            hidden.setdefault(seq, f"the {team} team")
        # A handoff step's result is its child run's: hidden if anything in that subtree is.
        for child in Run.objects.filter(parent=run).order_by("id"):
            blocked = hidden_from(user, _with_descendants(child)).order_by("id").first()
            if blocked is not None and child.parent_step_seq is not None:
                hidden.setdefault(child.parent_step_seq, f"the {blocked.team} team")
        return hidden

    def page_links(self, user, run: Run) -> list[Link]:
        if not has_role(user, AUDIT):
            return []
        return [Link("Audit replay", reverse("approvals:audit_run", kwargs={"run_id": run.pk}))]

    def page_panels(self, user, run: Run) -> list[Link]:
        if not has_role(user, REVIEW, MANAGE_POLICY):
            return []
        url = reverse("approvals:run_grants", kwargs={"run_id": run.pk})
        return [Link("Allowed similar", url)]  # reviewers' grants, scoped by grants_visible_to


def grants_visible_to(user) -> QuerySet[Grant]:
    """The grants ``user`` may list and revoke: policy admins every one; reviewers the "allow
    similar" grants made on requests they may see, and their own."""
    if has_role(user, MANAGE_POLICY):
        return Grant.objects.all()
    if not has_role(user, REVIEW):
        return Grant.objects.none()
    return Grant.objects.filter(Q(request__in=visible_to(user)) | Q(created_by=user))


def check_grant(grant: Grant, user) -> None:
    """Raise ``PermissionDenied`` unless ``user`` may revoke ``grant``."""
    if not grants_visible_to(user).filter(pk=grant.pk).exists():
        team = grant.request.team if grant.request_id else ""
        raise PermissionDenied(
            f"This grant was made on a request for the {team} team."
            if team
            else "Only policy admins manage this grant."
        )
