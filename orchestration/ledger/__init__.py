"""The ledger: an append-only SHA-256 hash chain of everything that happened.

Every layer writes its records with ``ledger_append`` inside its own transaction, so a change and
its record commit together or not at all. References are plain ids, never foreign keys, so nothing
can cascade into the ledger. The database refuses a record that does not extend the chain's head
and moves the head with each insert; on PostgreSQL it also refuses to update, delete or truncate
records except pruning's deletion (migration 0011); signed checkpoints outside the database
(``checkpoints``) catch a chain rewritten wholesale or cut at its tail; ``retention`` prunes
records past their retention period.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestration.ledger.models import LedgerVerification


def last_verification() -> "LedgerVerification | None":
    """The latest recorded verification run (beat's or ``audit_verify``'s), if any."""
    from orchestration.ledger.models import LedgerVerification

    return LedgerVerification.objects.order_by("-at", "-id").first()
