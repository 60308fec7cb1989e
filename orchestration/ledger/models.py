from django.db import models

GENESIS_HASH = "0" * 64


class LedgerError(Exception):
    """A ledger write or read that must not happen; the message says why."""


class AuditRecordQuerySet(models.QuerySet):
    def update(self, **kwargs):
        raise LedgerError("The ledger is append-only: audit records cannot be updated.")

    def delete(self):
        raise LedgerError("The ledger is append-only: audit records cannot be deleted.")

    def bulk_update(self, objs, fields, batch_size=None):
        raise LedgerError("The ledger is append-only: audit records cannot be updated.")


class AuditRecord(models.Model):
    """One link of the chain. ``hash`` = SHA-256 over the previous hash and the canonical text
    of every other column (see ``orchestration.ledger.chain.record_digest``)."""

    seq = models.PositiveBigIntegerField(unique=True)
    at = models.DateTimeField()
    actor = models.CharField(max_length=150, help_text="who acted: a username, or 'system'")
    actor_user_id = models.BigIntegerField(null=True, blank=True)
    verb = models.CharField(max_length=100, db_index=True, help_text="dotted, e.g. account.login")
    run_id = models.BigIntegerField(null=True, blank=True, db_index=True)
    agent_id = models.BigIntegerField(null=True, blank=True, db_index=True)
    approval_id = models.BigIntegerField(null=True, blank=True, db_index=True)
    user_id = models.BigIntegerField(
        null=True, blank=True, help_text="the account the record is about, if any"
    )
    object_type = models.CharField(max_length=60, blank=True, default="")
    object_id = models.CharField(max_length=64, blank=True, default="")
    payload = models.TextField(help_text="canonical JSON")
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64, unique=True)

    objects = AuditRecordQuerySet.as_manager()

    class Meta:
        ordering = ["seq"]
        indexes = [models.Index(fields=["at"], name="audit_at_idx")]

    def __str__(self) -> str:
        return f"#{self.seq} {self.verb} by {self.actor}"

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise LedgerError("The ledger is append-only: audit records cannot be updated.")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise LedgerError("The ledger is append-only: audit records cannot be deleted.")


class LedgerHead(models.Model):
    """The single row holding the chain's last sequence and hash. Writers lock it last, so the
    chain stays linear under concurrent transactions; ``audit_verify`` also checks the chain
    ends where the head says, so dropping records from the end is caught."""

    seq = models.PositiveBigIntegerField(default=0)
    hash = models.CharField(max_length=64, default=GENESIS_HASH)

    def __str__(self) -> str:
        return f"ledger head #{self.seq}"
