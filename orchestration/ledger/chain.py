"""Appending to and verifying the hash chain."""

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any

from django.db import connections, transaction
from django.utils import timezone

from orchestration.canonical import CanonicalError, canonical_json, sha256_hex
from orchestration.ledger.actor import current_actor
from orchestration.ledger.checkpoints import (
    PRUNE,
    Checkpoint,
    CheckpointError,
    checkpoint_at,
    latest_checkpoint,
    read_checkpoints,
)
from orchestration.ledger.models import GENESIS_HASH, AuditRecord, LedgerError, LedgerHead

VERB_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
REFERENCE_FIELDS = ("run_id", "agent_id", "approval_id", "user_id", "object_type", "object_id")
SEARCH_FIELDS = ("workflow", "tool", "outcome", "risk", "reason")


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
    envelope = _envelope(
        seq=seq,
        at=at,
        actor=actor,
        actor_user_id=actor_user_id,
        verb=verb,
        payload=payload,
        **references,
    )
    return sha256_hex(prev_hash + "\n" + canonical_json(envelope))


def _envelope(
    *,
    seq: int,
    at: datetime,
    actor: str,
    actor_user_id: int | None,
    verb: str,
    payload: str,
    **references: Any,
) -> dict[str, Any]:
    return {
        "seq": seq,
        "at": at.astimezone(UTC).isoformat(timespec="microseconds"),
        "actor": actor,
        "actor_user_id": actor_user_id,
        "verb": verb,
        "payload": payload,
        **{field: references.get(field) for field in REFERENCE_FIELDS + SEARCH_FIELDS},
    }


_SEQ_MARK = '"seq":-1'


def _digest_halves(**fields: Any) -> tuple[str, str]:
    """The text ``record_digest`` hashes after the previous hash, split where the sequence goes:
    the digest of record ``seq`` is SHA-256 of ``prev_hash + before + str(seq) + after``. Inside
    canonical JSON every quote of a string value is escaped, so the marker is the key itself."""
    text = canonical_json(_envelope(seq=-1, **fields))
    before, mark, after = text.partition(_SEQ_MARK)
    if not mark or _SEQ_MARK in after:  # cannot happen; refuse rather than hash the wrong text
        raise LedgerError("The record's canonical text has no single sequence to fill in.")
    return "\n" + before + '"seq":', after


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
    workflow: str = "",
    tool: str = "",
    outcome: str = "",
    risk: int | None = None,
    reason: str = "",
) -> AuditRecord:
    """Append one record to the chain, inside the caller's transaction.

    ``workflow``, ``tool``, ``outcome``, ``risk`` and ``reason`` are what auditors search by;
    give them where the record is about a run's action or a decision on it.
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
        canonical_json(reason or "", path="reason")
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
        "workflow": workflow or "",
        "tool": tool or "",
        "outcome": outcome or "",
        "risk": risk,
        "reason": reason or "",
    }
    at = timezone.now()
    connection = transaction.get_connection()
    fields = {
        "at": at,
        "actor": actor_label,
        "actor_user_id": actor_user_id,
        "verb": verb,
        **references,
        "payload": payload_text,
    }
    # Lock the head last: everything above may fail or take time without holding the lock.
    if connection.vendor == "postgresql":
        record_id, seq, prev_hash, digest = _append_postgresql(connection, fields)
    else:
        record_id, seq, prev_hash, digest = _append_locked(connection, fields)

    record = AuditRecord(id=record_id, seq=seq, prev_hash=prev_hash, hash=digest, **fields)
    record._state.adding = False
    record._state.db = connection.alias
    return record


# An append on PostgreSQL is one statement: lock the head, hash the record onto it and insert
# the record. The lock is held from that statement to the commit only. On both databases the
# insert advances the head itself (a trigger, migration 0011), which refuses any record that does
# not extend it: nothing is written beyond the head, by this code or by anyone else.
_HEAD_PK = 1
INSERT_COLUMNS = (
    "seq",
    "at",
    "actor",
    "actor_user_id",
    "verb",
    *REFERENCE_FIELDS,
    *SEARCH_FIELDS,
    "payload",
    "prev_hash",
    "hash",
)
_FIELD_COLUMNS = INSERT_COLUMNS[1:-2]  # the columns known before the head is read


@cache
def _statements(vendor: str) -> dict[str, str]:
    # Identifiers come from the models' metadata and values are parameters: nothing is user text.
    qn = connections["default"].ops.quote_name
    records, head = qn(AuditRecord._meta.db_table), qn(LedgerHead._meta.db_table)
    columns = ", ".join(qn(column) for column in INSERT_COLUMNS)
    field_params = ", ".join(["%s"] * len(_FIELD_COLUMNS))
    create_head = f"INSERT INTO {head} (id, seq, hash) VALUES ({_HEAD_PK}, 0, %s)"  # noqa: S608
    create_head += " ON CONFLICT DO NOTHING"
    lock = f"SELECT seq, hash FROM {head} WHERE id = {_HEAD_PK}"  # noqa: S608
    statements = {"create_head": create_head, "lock": lock}
    if vendor == "postgresql":
        # FOR UPDATE waits for a concurrent append to commit and then returns the head it left.
        # sha256(prev_hash || before || seq || after) is record_digest's hash (see
        # _digest_halves), so verification, which recomputes it in Python, checks this too.
        append = f"WITH locked AS ({lock} FOR UPDATE), "
        append += "computed AS (SELECT seq + 1 AS seq, hash AS prev_hash, "
        append += "encode(sha256(convert_to(hash || %s || (seq + 1)::text || %s, 'UTF8')), 'hex')"
        append += " AS hash FROM locked) "
        append += f"INSERT INTO {records} ({columns}) "
        append += f"SELECT computed.seq, {field_params}, computed.prev_hash, computed.hash "
        append += "FROM computed RETURNING id, seq, prev_hash, hash"
        statements["append"] = append
    else:
        placeholders = ", ".join(["%s"] * len(INSERT_COLUMNS))
        statements["insert"] = f"INSERT INTO {records} ({columns}) VALUES ({placeholders})"  # noqa: S608
    return statements


def _params(connection, fields: dict[str, Any]) -> list[Any]:
    params = [fields[column] for column in _FIELD_COLUMNS]
    params[0] = connection.ops.adapt_datetimefield_value(fields["at"])
    return params


def _append_postgresql(connection, fields: dict[str, Any]) -> tuple[int, int, str, str]:
    statements = _statements(connection.vendor)
    before, after = _digest_halves(**fields)
    params = [before, after, *_params(connection, fields)]
    with connection.cursor() as cursor:
        cursor.execute(statements["append"], params)
        row = cursor.fetchone()
        if row is None:  # no head: a flushed test database (the migrations create it)
            cursor.execute(statements["create_head"], [GENESIS_HASH])
            cursor.execute(statements["append"], params)
            row = cursor.fetchone()
    return row


def _append_locked(connection, fields: dict[str, Any]) -> tuple[int, int, str, str]:
    """SQLite: its IMMEDIATE transactions hold the database's write lock from their start, so
    reading the head, inserting and advancing cannot interleave with another writer."""
    statements = _statements(connection.vendor)
    with connection.cursor() as cursor:
        cursor.execute(statements["lock"])
        row = cursor.fetchone()
        if row is None:  # a flushed test database; the migrations create the head
            cursor.execute(statements["create_head"], [GENESIS_HASH])
            row = (0, GENESIS_HASH)
        seq, prev_hash = row[0] + 1, row[1]
        digest = record_digest(prev_hash=prev_hash, seq=seq, **fields)
        params = [seq, *_params(connection, fields), prev_hash, digest]
        cursor.execute(statements["insert"], params)
        record_id = cursor.lastrowid
    return record_id, seq, prev_hash, digest


def _actor_fields(actor: Any) -> tuple[str, int | None]:
    if isinstance(actor, str):
        return actor, None
    if getattr(actor, "is_authenticated", False):
        return actor.get_username(), actor.pk
    return "anonymous", None


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int
    last_seq: int
    last_hash: str
    error: str = ""
    first_seq: int | None = None  # the first record checked
    checkpoints: int = 0  # signed checkpoints found to match the chain


def ledger_verify(
    *, chunk_size: int = 2000, since_last_checkpoint: bool = False, upto: int | None = None
) -> VerifyResult:
    """Walk the chain in order and stop at the first broken link.

    By default the whole chain: from #1 or, once pruned, from the first remaining record, which
    must link to a valid signed prune checkpoint of the record before it (a periodic one, or a
    checkpoint of a record further back, only shows that records were deleted). Every checkpoint
    must match the record at its sequence (so a chain rewritten with every hash recomputed is
    caught), none may lie beyond the chain's end (a cut tail), and every file in the checkpoint
    folder must be a validly signed checkpoint. Every row is walked, whatever the head says: the
    chain must end exactly at its head, and a row beyond it is reported with its id.

    ``since_last_checkpoint``: only the records after the latest checkpoint, which must link to
    it (beat's periodic check). ``upto``: stop after that record and skip the checks of the
    chain's end (pruning verifies what it is about to delete).
    """
    # Checkpoints are read before the records: each was written once the head it names was
    # committed, so none read here lies beyond the chain the walk sees unless the tail was cut.
    try:
        if since_last_checkpoint:
            start = latest_checkpoint()
            anchors = {start.seq: start} if start else {}
            problems: list[str] = []
        else:
            start = None
            checkpoints, problems = read_checkpoints()
            anchors = {checkpoint.seq: checkpoint for checkpoint in checkpoints}
    except CheckpointError as exc:
        return VerifyResult(False, 0, 0, "", str(exc))
    with _snapshot():
        return _walk(start, anchors, problems, upto, chunk_size)


@contextmanager
def _snapshot() -> Iterator[None]:
    """On PostgreSQL, outside any transaction, read the head and the records from one snapshot
    (pruning or appends meanwhile do not show as breaks); elsewhere the head is read before and
    after the walk, and appends meanwhile lie between the two (see ``_end_problem``)."""
    connection = transaction.get_connection()
    if connection.vendor != "postgresql" or connection.in_atomic_block:
        yield
        return
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        yield


def _walk(
    start: Checkpoint | None,
    anchors: dict[int, Checkpoint],
    problems: list[str],
    upto: int | None,
    chunk_size: int,
) -> VerifyResult:
    head = _head()
    records = AuditRecord.objects.order_by("seq")
    if upto is not None:
        records = records.filter(seq__lte=upto)
    checked, matched = 0, 0

    if start is not None:  # the segment after the latest checkpoint
        if head is None or head[0] < start.seq:
            ends = head[0] if head else 0
            return VerifyResult(
                False,
                0,
                ends,
                head[1] if head else GENESIS_HASH,
                f"checkpoint #{start.seq} lies beyond the chain's end #{ends}: "
                "records were cut from its tail",
            )
        at_start = AuditRecord.objects.filter(seq=start.seq).values_list("hash", flat=True)
        if at_start and at_start[0] != start.hash:
            return VerifyResult(
                False,
                0,
                start.seq - 1,
                "",
                f"#{start.seq} differs from its signed checkpoint: the chain was rewritten",
            )
        matched = len(at_start)
        prev_hash, expected_seq = start.hash, start.seq + 1
        records = records.filter(seq__gt=start.seq)
    else:
        first = AuditRecord.objects.order_by("seq").values_list("seq", "prev_hash").first()
        if first is None or first[0] == 1:
            prev_hash, expected_seq = GENESIS_HASH, 1
        else:  # pruned: the first remaining record links to the checkpoint pruning wrote
            before = first[0] - 1
            if (before not in anchors or anchors[before].kind != PRUNE) and (
                late := checkpoint_at(before)
            ) is not None:
                anchors[before] = late  # written by a pruning that ended meanwhile
            anchor = anchors.get(before)
            if anchor is None or anchor.kind != PRUNE:
                # Pruning writes its checkpoint before deleting and removes the ones below it:
                # a periodic checkpoint anchors no cut, and older ones vouch for deleted records.
                which = "valid" if anchor is None else "pruning's"
                error = (
                    f"records up to #{before} are gone and no {which} signed checkpoint of "
                    f"#{before} vouches for #{first[0]}"
                )
                if anchor is not None:
                    error += f": the checkpoint of #{before} is a periodic one"
                if older := [seq for seq in anchors if seq < before]:
                    error += f" (checkpoint #{max(older)} vouches for records that are gone)"
                return VerifyResult(False, 0, before, "", error)
            if anchor.hash != first[1]:
                return VerifyResult(
                    False,
                    0,
                    before,
                    anchor.hash,
                    f"#{first[0]} does not link to the signed checkpoint of #{before}",
                )
            prev_hash, expected_seq = anchor.hash, first[0]
            matched = 1
    first_seq = expected_seq
    head_seq = head[0] if head else 0
    at_head = prev_hash if head_seq == expected_seq - 1 else None  # the hash of #head_seq

    def broken(message: str) -> VerifyResult:
        return VerifyResult(
            False, checked, expected_seq - 1, prev_hash, message, first_seq, matched
        )

    for record in records.iterator(chunk_size=chunk_size):
        row = f"(row id {record.pk})"
        if record.seq != expected_seq:
            return broken(f"sequence gap: expected #{expected_seq}, found #{record.seq} {row}")
        if record.prev_hash != prev_hash:
            return broken(f"#{record.seq} does not link to the hash of #{record.seq - 1} {row}")
        try:
            canonical = canonical_json(json.loads(record.payload), path="payload")
        except (ValueError, CanonicalError) as exc:
            return broken(f"#{record.seq} payload is not canonical JSON: {exc} {row}")
        if canonical != record.payload:
            return broken(f"#{record.seq} payload is not in canonical form {row}")
        digest = record_digest(
            prev_hash=record.prev_hash,
            seq=record.seq,
            at=record.at,
            actor=record.actor,
            actor_user_id=record.actor_user_id,
            verb=record.verb,
            payload=record.payload,
            **{field: getattr(record, field) for field in REFERENCE_FIELDS + SEARCH_FIELDS},
        )
        if digest != record.hash:
            return broken(f"#{record.seq} was altered: its hash does not match its content {row}")
        if record.seq in anchors:
            if anchors[record.seq].hash != record.hash:
                return broken(
                    f"#{record.seq} differs from its signed checkpoint: the chain was rewritten "
                    f"{row}"
                )
            matched += 1
        if record.seq == head_seq:
            at_head = record.hash
        prev_hash, expected_seq, checked = record.hash, expected_seq + 1, checked + 1

    last_seq = expected_seq - 1
    if upto is not None:
        if last_seq != upto:
            return broken(f"the chain ends at #{last_seq}, before #{upto}")
    else:
        if problem := _end_problem(head, at_head, last_seq, prev_hash):
            return broken(problem)
        beyond = [seq for seq in anchors if seq > last_seq]
        if beyond:
            return broken(
                f"checkpoint #{max(beyond)} lies beyond the chain's end #{last_seq}: "
                "records were cut from its tail"
            )
    if problems:
        return broken("; ".join(problems))
    return VerifyResult(True, checked, last_seq, prev_hash, "", first_seq, matched)


def _head() -> tuple[int, str] | None:
    return LedgerHead.objects.filter(pk=1).values_list("seq", "hash").first()


def _end_problem(
    before: tuple[int, str] | None, at_before: str | None, last_seq: int, last_hash: str
) -> str:
    """What is wrong with where the walk ended (at ``last_seq``, ``last_hash``), given the head
    read before the walk (whose record's hash the walk found to be ``at_before``) and the head
    read after it: records appended meanwhile lie between the two; a row beyond the second was
    written outside ``ledger_append`` (the database refuses that; forcing it takes a superuser),
    and a head past the chain's end means records were cut."""
    after = _head()
    if after is None:
        return f"the chain ends at #{last_seq} but it has no head" if last_seq else ""
    if before is not None and (last_seq < before[0] or at_before != before[1]):
        return f"the chain ends at #{last_seq} but its head says #{before[0]}"
    if last_seq > after[0]:
        row = AuditRecord.objects.filter(seq__gt=after[0]).order_by("seq").first()
        return (
            f"#{row.seq} (row id {row.pk}) lies beyond the chain's head #{after[0]}: it was "
            "written outside ledger_append"
        )
    if last_seq == after[0] and last_hash != after[1]:
        return f"the chain ends at #{last_seq} but its head says #{after[0]} with another hash"
    return ""
