"""Helpers for the ledger's tests: appends, and changes
made behind the ORM's and the database trigger's back, as someone with database access could."""

from datetime import datetime

from django.db import connection, transaction

from orchestration.ledger.chain import REFERENCE_FIELDS, SEARCH_FIELDS, ledger_append, record_digest
from orchestration.ledger.models import AuditRecord


def append(verb: str = "test.happened", **kwargs) -> AuditRecord:
    with transaction.atomic():
        return ledger_append(verb, **kwargs)


def append_many(count: int, **kwargs) -> list[AuditRecord]:
    return [append(payload={"n": n}, **kwargs) for n in range(count)]


LEDGER_TABLES = ("orchestration_auditrecord", "orchestration_ledgerhead")


def tamper(sql: str, params: list | tuple = ()) -> None:
    """Run ``sql`` with the ledger's triggers bypassed, as a superuser can: on PostgreSQL with
    the replication role; on SQLite, where whoever writes the file can, by dropping them for
    the statement."""
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL session_replication_role = replica")
            cursor.execute(sql, params)
            cursor.execute("SET LOCAL session_replication_role = origin")
            return
        cursor.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name IN (%s, %s)",
            LEDGER_TABLES,
        )
        triggers = cursor.fetchall()
        for name, _ in triggers:
            cursor.execute(f"DROP TRIGGER {name}")
        cursor.execute(sql, params)
        for _, create in triggers:
            cursor.execute(create)


def rewrite_chain(from_seq: int, payload: str) -> None:
    """Change the payload of ``from_seq`` and recompute every hash from there on, head included,
    so that the chain is consistent in itself again: only a checkpoint can tell."""
    records = list(AuditRecord.objects.filter(seq__gte=from_seq).order_by("seq"))
    prev_hash = records[0].prev_hash
    for record in records:
        if record.seq == from_seq:
            record.payload = payload
        digest = record_digest(
            prev_hash=prev_hash,
            seq=record.seq,
            at=record.at,
            actor=record.actor,
            actor_user_id=record.actor_user_id,
            verb=record.verb,
            payload=record.payload,
            **{field: getattr(record, field) for field in REFERENCE_FIELDS + SEARCH_FIELDS},
        )
        tamper(
            "UPDATE orchestration_auditrecord SET payload = %s, prev_hash = %s, hash = %s "
            "WHERE seq = %s",
            [record.payload, prev_hash, digest, record.seq],
        )
        prev_hash = digest
    tamper("UPDATE orchestration_ledgerhead SET hash = %s WHERE id = 1", [prev_hash])


def backdate(seq_below: int, when: datetime) -> None:
    """Give the remaining records below ``seq_below`` the time ``when``, recomputing every hash
    from the first of them so the chain stays intact, as if they had been written then."""
    records = list(AuditRecord.objects.order_by("seq"))
    prev_hash = records[0].prev_hash
    for record in records:
        at = when if record.seq < seq_below else record.at
        digest = record_digest(
            prev_hash=prev_hash,
            seq=record.seq,
            at=at,
            actor=record.actor,
            actor_user_id=record.actor_user_id,
            verb=record.verb,
            payload=record.payload,
            **{field: getattr(record, field) for field in REFERENCE_FIELDS + SEARCH_FIELDS},
        )
        tamper(
            "UPDATE orchestration_auditrecord SET at = %s, prev_hash = %s, hash = %s "
            "WHERE seq = %s",
            [connection.ops.adapt_datetimefield_value(at), prev_hash, digest, record.seq],
        )
        prev_hash = digest
    tamper("UPDATE orchestration_ledgerhead SET hash = %s WHERE id = 1", [prev_hash])
