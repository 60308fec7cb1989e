"""Who may see and act on what: the one home of Baton's role and team checks.

Reviewers see and decide only their teams' requests (and those of teams they are the escalation
team of, once escalated), plus requests without a team. Every view, consumer and service that
shows or acts on a request asks here."""

from django.core.exceptions import PermissionDenied
from django.db.models import Q, QuerySet

from approvals.queue.models import ApprovalRequest, RequestStatus


def visible_to(reviewer) -> QuerySet[ApprovalRequest]:
    """The requests a reviewer may see and decide: their teams' (and their escalation teams'),
    and those without a team."""
    teams = list(reviewer.reviewer_teams.values_list("name", flat=True))
    escalated = Q(status=RequestStatus.ESCALATED, obligations__escalation_team__in=teams)
    return ApprovalRequest.objects.filter(Q(team="") | Q(team__in=teams) | escalated)


def check_team(request: ApprovalRequest, reviewer) -> None:
    """Raise ``PermissionDenied`` unless ``reviewer`` may see and decide ``request``."""
    if not visible_to(reviewer).filter(pk=request.pk).exists():
        raise PermissionDenied(f"This request is for the {request.team} team.")
