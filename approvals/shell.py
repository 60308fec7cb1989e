"""The app shell: navigation by role and the worker banner, for every page."""

from dataclasses import dataclass

from django.urls import reverse

from approvals.access import has_role
from approvals.roles import AUDIT, MANAGE_POLICY, REVIEW
from orchestration.workers import worker_status


@dataclass(frozen=True)
class NavItem:
    label: str
    url_name: str
    permission: str | tuple[str, ...] | None  # a tuple: any of them; None: superusers only
    section: str = ""  # also current on every page whose view name starts with this

    def visible_to(self, user) -> bool:
        if self.permission is None:
            return user.is_superuser
        if isinstance(self.permission, tuple):
            return has_role(user, *self.permission)
        return has_role(user, self.permission)

    def is_current(self, view_name: str) -> bool:
        return view_name == self.url_name or bool(
            self.section and view_name.startswith(self.section)
        )


# Each role's own page first: a user lands on the first item they may open.
NAV = [
    NavItem("Approval queue", "approvals:queue", REVIEW),
    NavItem("Policy", "policy:rules", MANAGE_POLICY, section="policy:"),
    NavItem("Roles", "approvals:roles", MANAGE_POLICY),
    NavItem("Audit trail", "approvals:audit", AUDIT, section="approvals:audit"),
    NavItem("Runs", "runs:list", (REVIEW, MANAGE_POLICY, AUDIT), section="runs:"),
    NavItem("Django admin", "admin:index", None),
]


def landing_url(user) -> str | None:
    """Where a user works: Django's admin for superusers, else the first page of the
    navigation they may open."""
    if user.is_superuser:
        return reverse("admin:index")
    for item in NAV:
        if item.visible_to(user):
            return reverse(item.url_name)
    return None


def navigation(request) -> dict:
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    current = request.resolver_match.view_name if request.resolver_match else ""
    items = [
        {"label": item.label, "url": reverse(item.url_name), "current": item.is_current(current)}
        for item in NAV
        if item.visible_to(user)
    ]
    return {"nav_items": items, "worker_status": worker_status()}
