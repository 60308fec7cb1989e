"""The auditors' one write: an export is itself recorded in the ledger before it streams."""

from django.db import transaction

from approvals.audit.search import AuditFilters
from orchestration.ledger.chain import ledger_append
from orchestration.ledger.models import AuditRecord

EXPORT_FORMATS = ("csv", "jsonl")


def audit_export_record(*, user, format: str, filters: AuditFilters) -> AuditRecord:
    """Record who exported what, in its own transaction, committed before the first byte is
    sent. The export then covers the records before this one (``through_seq``): a fixed set,
    whatever is appended while it streams."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"Unknown export format {format!r}.")
    with transaction.atomic(durable=True):
        return ledger_append(
            "audit.exported",
            actor=user,
            user_id=user.pk,
            outcome="exported",
            run_id=filters.run,
            payload={"format": format, "filters": filters.raw},
        )
