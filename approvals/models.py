from django.db import models

from approvals.policy.models import (
    ArgumentFactor,
    AutonomyThreshold,
    Grant,
    PolicyEvaluation,
    PolicyVersion,
    Rule,
)
from approvals.queue.models import ApprovalRequest, Decision, ReviewerTeam

__all__ = [
    "ApprovalRequest",
    "ArgumentFactor",
    "AutonomyThreshold",
    "Decision",
    "Grant",
    "PolicyEvaluation",
    "PolicyVersion",
    "ReviewerTeam",
    "RoleCapability",
    "Rule",
]


class RoleCapability(models.Model):
    """Holds the permissions that Baton's roles grant; it has no table. The groups that carry
    them are created by ``approvals.roles.ensure_roles`` after every migrate."""

    class Meta:
        managed = False
        default_permissions = ()
        permissions = [
            ("review_actions", "Can claim and decide actions in the approval queue"),
            ("manage_policy", "Can configure policies, thresholds, agents and tools"),
            ("audit_ledger", "Can search, replay and export the audit trail"),
        ]

    def __str__(self) -> str:
        return "role capability"
