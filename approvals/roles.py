"""Baton's roles are Django groups with fixed permissions, (re)created after every migrate so
that tests which flush tables get them back."""

from collections.abc import Callable

from django.contrib.auth.decorators import login_required, permission_required
from django.contrib.auth.models import Group, Permission

REVIEWER = "Reviewer"
POLICY_ADMIN = "Policy admin"
AUDITOR = "Auditor"

ROLE_PERMISSIONS: dict[str, list[str]] = {
    REVIEWER: ["review_actions"],
    POLICY_ADMIN: ["manage_policy", "audit_ledger"],
    AUDITOR: ["audit_ledger"],
}

REVIEW = "approvals.review_actions"
MANAGE_POLICY = "approvals.manage_policy"
AUDIT = "approvals.audit_ledger"


def ensure_roles(**kwargs) -> None:
    """Idempotent: creates missing groups and adds missing permissions, never removes any an
    administrator added."""
    for name, codenames in ROLE_PERMISSIONS.items():
        group, _ = Group.objects.get_or_create(name=name)
        permissions = Permission.objects.filter(
            content_type__app_label="approvals", codename__in=codenames
        )
        missing = set(codenames) - {p.codename for p in permissions}
        if missing:
            raise RuntimeError(f"Permissions {sorted(missing)} are missing; run migrate.")
        group.permissions.add(*permissions)


def role_required(permission: str) -> Callable:
    """Anonymous users go to the login page; signed-in users without ``permission`` get 403."""

    def decorator(view: Callable) -> Callable:
        return login_required(permission_required(permission, raise_exception=True)(view))

    return decorator
