"""Every record extends the chain's head, whoever writes it (migration 0011, on PostgreSQL and
SQLite): a row written beside ``ledger_append`` either becomes the next link, visible to
verification and followed by later appends, or is refused; one forced in past the database
(triggers off, as only a superuser can) is reported by verification with its row id."""

import pytest
from django.core.management import CommandError, call_command
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from orchestration.ledger.chain import INSERT_COLUMNS, ledger_verify, record_digest
from orchestration.ledger.models import GENESIS_HASH, AuditRecord, LedgerHead
from tests.orchestration.ledger.conftest import append, append_many, tamper

pytestmark = pytest.mark.django_db

REFUSED = "The audit ledger"


def insert_sql() -> str:
    columns = ", ".join(INSERT_COLUMNS)
    values = ", ".join(["%s"] * len(INSERT_COLUMNS))
    return f"INSERT INTO orchestration_auditrecord ({columns}) VALUES ({values})"  # noqa: S608


def forged(seq: int, prev_hash: str, digest: str | None = None) -> list:
    """The values of a record written by hand, as the application's database role could: its
    own digest unless ``digest`` is given."""
    at = timezone.now()
    fields = {
        "actor": "finance-lead",
        "actor_user_id": None,
        "verb": "approval.decided",
        "payload": '{"amount":1899}',
        "run_id": None,
        "agent_id": None,
        "approval_id": None,
        "user_id": None,
        "object_type": "",
        "object_id": "",
        "workflow": "",
        "tool": "payments.refund",
        "outcome": "approve",
        "risk": None,
        "reason": "",
    }
    digest = digest or record_digest(prev_hash=prev_hash, seq=seq, at=at, **fields)
    values = {**fields, "seq": seq, "at": at, "prev_hash": prev_hash, "hash": digest}
    values["at"] = connection.ops.adapt_datetimefield_value(at)
    return [values[column] for column in INSERT_COLUMNS]


def insert(values: list) -> None:
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(insert_sql(), values)


def head() -> tuple[int, str]:
    return LedgerHead.objects.values_list("seq", "hash").get()


@pytest.mark.parametrize(
    ("seq", "link"),
    [(4, "another"), (5, "head"), (9, "another")],
    ids=["wrong-link", "beyond-the-head", "far-beyond"],
)
def test_a_record_that_does_not_extend_the_head_is_refused(seq, link):
    records = append_many(3)
    prev_hash = records[-1].hash if link == "head" else records[0].hash
    with pytest.raises(DatabaseError, match=REFUSED):
        insert(forged(seq, prev_hash))
    assert list(AuditRecord.objects.values_list("seq", flat=True)) == [1, 2, 3]
    assert head() == (3, records[-1].hash)
    assert append().seq == 4
    assert ledger_verify().ok


def test_a_record_written_by_hand_onto_the_head_is_a_link_appends_follow():
    records = append_many(3)
    insert(forged(4, records[-1].hash))
    assert head() == (4, AuditRecord.objects.get(seq=4).hash)

    after = append()  # before: a unique violation on #4, for this append and every later one
    assert (after.seq, after.prev_hash) == (5, AuditRecord.objects.get(seq=4).hash)
    result = ledger_verify()
    assert result.ok, result.error
    assert (result.checked, result.last_seq) == (5, 5)


def test_a_linked_record_with_a_wrong_hash_is_reported_with_its_row_id():
    records = append_many(3)
    insert(forged(4, records[-1].hash, digest="f" * 64))
    row = AuditRecord.objects.get(seq=4)
    assert append().prev_hash == "f" * 64  # the chain goes on; the forgery stays in it

    result = ledger_verify()
    assert not result.ok
    assert result.error == (
        f"#4 was altered: its hash does not match its content (row id {row.pk})"
    )
    assert result.last_seq == 3


def test_a_row_forced_in_beyond_the_head_is_reported_with_its_row_id():
    records = append_many(3)
    tamper(insert_sql(), forged(4, records[-1].hash))  # triggers off: the head stays at #3
    row = AuditRecord.objects.get(seq=4)
    assert head() == (3, records[-1].hash)

    result = ledger_verify()
    assert not result.ok
    assert result.error == (
        f"#4 (row id {row.pk}) lies beyond the chain's head #3: it was written outside "
        "ledger_append"
    )
    with pytest.raises(CommandError, match=rf"#4 \(row id {row.pk}\) lies beyond"):
        call_command("audit_verify")


def test_a_row_forced_in_past_a_gap_is_reported_with_its_row_id():
    records = append_many(3)
    tamper(insert_sql(), forged(7, records[-1].hash))
    row = AuditRecord.objects.get(seq=7)
    result = ledger_verify()
    assert result.error == f"sequence gap: expected #4, found #7 (row id {row.pk})"


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE orchestration_ledgerhead SET seq = 0, hash = %s",  # rewound
        "UPDATE orchestration_ledgerhead SET seq = 4, hash = %s",  # moved past the records
        "UPDATE orchestration_ledgerhead SET seq = 3, hash = %s",  # another hash
    ],
)
def test_the_head_moves_only_with_an_append(sql):
    records = append_many(3)
    with (
        pytest.raises(DatabaseError, match=REFUSED),
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute(sql, [GENESIS_HASH])
    assert head() == (3, records[-1].hash)
    assert append().seq == 4


def test_a_head_is_created_only_on_an_empty_ledger():
    append_many(2)
    tamper("DELETE FROM orchestration_ledgerhead")
    with pytest.raises(DatabaseError, match=REFUSED), transaction.atomic():
        append()  # it would start the chain over at #1
    assert AuditRecord.objects.count() == 2
    assert "the chain ends at #2 but it has no head" in ledger_verify().error
