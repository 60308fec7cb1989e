"""Retention: records older than ``BATON_AUDIT_RETENTION_DAYS`` are deleted, after a signed
prune checkpoint of the last deleted record vouches for the first one kept (only a prune
checkpoint anchors a pruned chain; the checkpoints below it are removed).

Deleting is the database's one exit from append-only (migration 0011): on PostgreSQL a DELETE
must stay below the boundary named by the latest ``ledger.pruned`` record, itself a link of the
chain. Pruning appends that record and deletes in one transaction, so what was deleted, up to
where, when and under which retention stays in the chain. Anyone who can append can append such
a record and delete up to it, but not without leaving it behind, and not without a prune
checkpoint, which takes the signing key: verification then reports the records as gone.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from orchestration.ledger.chain import ledger_append, ledger_verify
from orchestration.ledger.checkpoints import (
    PRUNE,
    Checkpoint,
    checkpoint_at,
    remove_checkpoints_below,
    write_checkpoint,
)
from orchestration.ledger.models import AuditRecord, LedgerError, LedgerVerification

PRUNED = "ledger.pruned"  # the verb migration 0011's trigger reads the boundary from


@dataclass(frozen=True)
class PruneResult:
    deleted: int
    keep_from: int | None  # the first record kept (the boundary), if any was considered
    checkpoint: Checkpoint | None  # the prune checkpoint of keep_from - 1, written before deleting


def ledger_prune(*, retention_days: int | None = None, now: datetime | None = None) -> PruneResult:
    """Delete the records older than the retention period (and the recorded verification runs
    older than it); the chain's last record always stays.

    First verifies what is about to go (intact, anchored, linked to the first record kept), then
    writes and reads back the signed prune checkpoint of the last record to go (replacing a
    periodic one of it), then appends the ``ledger.pruned`` record naming the boundary and
    deletes below it in one transaction, then removes the checkpoints below it. Raises
    ``LedgerError`` (or ``CheckpointError``) and deletes nothing if any step fails.
    """
    days = settings.BATON_AUDIT_RETENTION_DAYS if retention_days is None else retention_days
    if days <= 0:
        return PruneResult(0, None, None)
    cutoff = (now or timezone.now()) - timedelta(days=days)
    LedgerVerification.objects.filter(at__lt=cutoff).delete()  # the runs' own records go too
    seqs = AuditRecord.objects.values_list("seq", flat=True)
    first, last = seqs.order_by("seq").first(), seqs.order_by("-seq").first()
    if first is None:
        return PruneResult(0, None, None)
    keep_from = seqs.filter(at__gte=cutoff).order_by("seq").first() or last
    if keep_from <= first:
        return PruneResult(0, keep_from, None)

    verified = ledger_verify(upto=keep_from - 1)
    if not verified.ok:
        raise LedgerError(f"Refused to prune: the ledger is broken: {verified.error}")
    link = AuditRecord.objects.filter(seq=keep_from).values_list("prev_hash", flat=True).first()
    if link != verified.last_hash:
        raise LedgerError(f"Refused to prune: #{keep_from} does not link to #{keep_from - 1}")

    checkpoint = write_checkpoint(keep_from - 1, verified.last_hash, kind=PRUNE)
    written = checkpoint_at(keep_from - 1)
    if written is None or (written.hash, written.kind) != (verified.last_hash, PRUNE):
        raise LedgerError(f"Refused to prune: the checkpoint of #{keep_from - 1} did not stick")

    table = connection.ops.quote_name(AuditRecord._meta.db_table)
    with transaction.atomic(), connection.cursor() as cursor:
        ledger_append(
            PRUNED,
            actor="system",
            payload={
                "below": keep_from,
                "from": first,
                "anchor_hash": verified.last_hash,
                "cutoff": cutoff.isoformat(),
                "retention_days": days,
            },
            object_type="ledger",
            object_id=keep_from,
        )
        cursor.execute(f"DELETE FROM {table} WHERE seq < %s", [keep_from])  # noqa: S608
        deleted = cursor.rowcount
    remove_checkpoints_below(keep_from - 1)
    return PruneResult(deleted, keep_from, checkpoint)
