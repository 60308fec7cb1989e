from django.db import models
from django.utils import timezone

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
    # What auditors search by, kept in columns so the search is indexed (and hashed, like all).
    workflow = models.CharField(max_length=120, blank=True, default="")
    tool = models.CharField(max_length=120, blank=True, default="")
    outcome = models.CharField(
        max_length=20, blank=True, default="", help_text="allow, ask, deny, approve, reject..."
    )
    risk = models.PositiveSmallIntegerField(null=True, blank=True, help_text="risk score 0-100")
    reason = models.TextField(blank=True, default="", help_text="the rule's or reviewer's words")
    payload = models.TextField(help_text="canonical JSON")
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64, unique=True)

    objects = AuditRecordQuerySet.as_manager()

    class Meta:
        ordering = ["seq"]
        indexes = [
            models.Index(fields=["at"], name="audit_at_idx"),
            models.Index(fields=["agent_id", "seq"], name="audit_agent_seq_idx"),
            models.Index(fields=["workflow", "seq"], name="audit_workflow_seq_idx"),
            models.Index(fields=["tool", "seq"], name="audit_tool_seq_idx"),
            models.Index(fields=["outcome", "seq"], name="audit_outcome_seq_idx"),
            models.Index(fields=["actor", "seq"], name="audit_actor_seq_idx"),
        ]

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
    chain stays linear under concurrent transactions. Only the database moves it: each inserted
    record must extend it and advances it (migration 0011), so no record lies beyond it.
    ``audit_verify`` checks the chain ends exactly where the head says: dropping records from the
    end, or forcing one in past the triggers, is caught."""

    seq = models.PositiveBigIntegerField(default=0)
    hash = models.CharField(max_length=64, default=GENESIS_HASH)

    def __str__(self) -> str:
        return f"ledger head #{self.seq}"


class LedgerVerification(models.Model):
    """One run of the chain's verification: by beat (the segment since the last checkpoint) or
    by ``audit_verify`` (the whole chain and every checkpoint)."""

    SOURCES = [("beat", "beat"), ("command", "command")]

    at = models.DateTimeField(default=timezone.now, db_index=True)
    ok = models.BooleanField()
    source = models.CharField(max_length=10, choices=SOURCES)
    checked = models.PositiveBigIntegerField(default=0, help_text="records checked")
    first_seq = models.PositiveBigIntegerField(null=True, blank=True)
    last_seq = models.PositiveBigIntegerField(null=True, blank=True)
    last_hash = models.CharField(max_length=64, blank=True, default="")
    error = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["-at", "-id"]

    def __str__(self) -> str:
        state = "intact" if self.ok else "BROKEN"
        return f"ledger {state} at {self.at:%Y-%m-%d %H:%M} ({self.source})"
