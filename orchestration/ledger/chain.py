"""Appending to and verifying the hash chain."""

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db import transaction
from django.utils import timezone

from orchestration.canonical import CanonicalError, canonical_json, sha256_hex
from orchestration.ledger.actor import current_actor
from orchestration.ledger.models import GENESIS_HASH, AuditRecord, LedgerError, LedgerHead

VERB_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
REFERENCE_FIELDS = ("run_id", "agent_id", "approval_id", "user_id", "object_type", "object_id")


def record_digest(
    *,
    prev_hash: str,
    seq: int,
    at: datetime,
    actor: str,
    actor_user_id: int | None,
    verb: str,
    payload: str,
    **references: Any,
) -> str:
    """SHA-256 over the previous hash and the canonical text of every column of the record."""
    envelope = {
        "seq": seq,
        "at": at.astimezone(UTC).isoformat(timespec="microseconds"),
        "actor": actor,
        "actor_user_id": actor_user_id,
        "verb": verb,
        "payload": payload,
        **{field: references.get(field) for field in REFERENCE_FIELDS},
    }
    return sha256_hex(prev_hash + "\n" + canonical_json(envelope))


def ledger_append(
    verb: str,
    *,
    payload: dict[str, Any] | None = None,
    actor: Any = None,
    run_id: int | None = None,
    agent_id: int | None = None,
    approval_id: int | None = None,
    user_id: int | None = None,
    object_type: str = "",
    object_id: str | int = "",
) -> AuditRecord:
    """Append one record to the chain, inside the caller's transaction.

    ``actor`` is a user, a label such as ``"system"``, or omitted for the current actor (the
    request's user, see ``orchestration.ledger.actor``). Raises ``LedgerError`` outside a
    transaction, for a malformed verb, or for a payload with no canonical form (a NUL character
    in agent text, NaN, a non-JSON value): the caller's change then fails with it.
    """
    if not transaction.get_connection().in_atomic_block:
        raise LedgerError("ledger_append must run inside the caller's transaction.atomic() block.")
    if not VERB_RE.match(verb):
        raise LedgerError(f"Ledger verb {verb!r} must be dotted lower-case, e.g. 'run.started'.")
    try:
        payload_text = canonical_json(payload or {}, path="payload")
    except CanonicalError as exc:
        raise LedgerError(f"Refused {verb} record: {exc}.") from exc

    actor_label, actor_user_id = _actor_fields(actor if actor is not None else current_actor())
    references = {
        "run_id": run_id,
        "agent_id": agent_id,
        "approval_id": approval_id,
        "user_id": user_id,
        "object_type": object_type,
        "object_id": str(object_id),
    }
    at = timezone.now()

    # Lock the head last: everything above may fail or take time without holding the lock.
    head = _locked_head()
    seq = head.seq + 1
    digest = record_digest(
        prev_hash=head.hash,
        seq=seq,
        at=at,
        actor=actor_label,
        actor_user_id=actor_user_id,
        verb=verb,
        payload=payload_text,
        **references,
    )
    record = AuditRecord.objects.create(
        seq=seq,
        at=at,
        actor=actor_label,
        actor_user_id=actor_user_id,
        verb=verb,
        payload=payload_text,
        prev_hash=head.hash,
        hash=digest,
        **references,
    )
    LedgerHead.objects.filter(pk=head.pk).update(seq=seq, hash=digest)
    return record


def _actor_fields(actor: Any) -> tuple[str, int | None]:
    if isinstance(actor, str):
        return actor, None
    if getattr(actor, "is_authenticated", False):
        return actor.get_username(), actor.pk
    return "anonymous", None


def _locked_head() -> LedgerHead:
    head = LedgerHead.objects.select_for_update().filter(pk=1).first()
    if head is None:  # a flushed test database; the migration creates it everywhere else
        LedgerHead.objects.bulk_create([LedgerHead(pk=1)], ignore_conflicts=True)
        head = LedgerHead.objects.select_for_update().get(pk=1)
    return head


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int
    last_seq: int
    last_hash: str
    error: str = ""


def ledger_verify(*, chunk_size: int = 2000) -> VerifyResult:
    """Walk the chain in order and stop at the first broken link."""
    prev_hash, expected_seq, checked = GENESIS_HASH, 1, 0

    def broken(message: str) -> VerifyResult:
        return VerifyResult(False, checked, expected_seq - 1, prev_hash, message)

    for record in AuditRecord.objects.order_by("seq").iterator(chunk_size=chunk_size):
        if record.seq != expected_seq:
            return broken(f"sequence gap: expected #{expected_seq}, found #{record.seq}")
        if record.prev_hash != prev_hash:
            return broken(f"#{record.seq} does not link to the hash of #{record.seq - 1}")
        try:
            canonical = canonical_json(json.loads(record.payload), path="payload")
        except (ValueError, CanonicalError) as exc:
            return broken(f"#{record.seq} payload is not canonical JSON: {exc}")
        if canonical != record.payload:
            return broken(f"#{record.seq} payload is not in canonical form")
        digest = record_digest(
            prev_hash=record.prev_hash,
            seq=record.seq,
            at=record.at,
            actor=record.actor,
            actor_user_id=record.actor_user_id,
            verb=record.verb,
            payload=record.payload,
            **{field: getattr(record, field) for field in REFERENCE_FIELDS},
        )
        if digest != record.hash:
            return broken(f"#{record.seq} was altered: its hash does not match its content")
        prev_hash, expected_seq, checked = record.hash, expected_seq + 1, checked + 1

    head = LedgerHead.objects.filter(pk=1).first()
    if head is not None and (head.seq, head.hash) != (expected_seq - 1, prev_hash):
        return broken(f"the chain ends at #{expected_seq - 1} but its head says #{head.seq}")
    return VerifyResult(True, checked, expected_seq - 1, prev_hash)
