"""PostgreSQL refuses UPDATE, DELETE and TRUNCATE of audit records and of the chain's head
(migration 0011), except the deletion below the boundary of the latest ``ledger.pruned`` record,
with no exit any session setting opens; and keeps one chain under concurrent writers."""

import os
import threading

import pytest
from django.core.management import call_command
from django.db import DatabaseError, connection, connections, transaction

from orchestration.ledger.chain import ledger_append, ledger_verify
from orchestration.ledger.models import AuditRecord, LedgerHead
from orchestration.ledger.verification import verify_and_checkpoint
from tests.orchestration.ledger.conftest import append, append_many

pytestmark = [pytest.mark.postgres, pytest.mark.django_db]

REFUSED = "The audit ledger is append-only"
# The settings 0008's trigger read: the test flush's exit and the pruning boundary.
OLD_EXITS = (("baton.ledger_exit", "test-teardown"), ("baton.ledger_prune_below", "99"))


def run(sql: str, *settings_: tuple[str, str]) -> int:
    """``sql`` in a transaction (a savepoint inside the test's) with the given local settings;
    returns the row count, or raises the database's error."""
    with transaction.atomic(), connection.cursor() as cursor:
        for name, value in settings_:
            cursor.execute("SELECT set_config(%s, %s, true)", [name, value])
        cursor.execute(sql)
        return cursor.rowcount


def seqs() -> list[int]:
    return list(AuditRecord.objects.values_list("seq", flat=True))


@pytest.mark.parametrize(
    ("sql", "error"),
    [
        ("UPDATE orchestration_auditrecord SET payload = '{}' WHERE seq = 2", "UPDATE on"),
        ("DELETE FROM orchestration_auditrecord WHERE seq = 2", "record #2 is not below"),
        ("DELETE FROM orchestration_auditrecord", "record #1 is not below the boundary \\(none\\)"),
        ("TRUNCATE orchestration_auditrecord", "TRUNCATE on"),
        ("TRUNCATE orchestration_auditrecord, orchestration_ledgerhead CASCADE", "TRUNCATE on"),
        ("UPDATE orchestration_ledgerhead SET seq = 0", "UPDATE on orchestration_ledgerhead"),
        ("DELETE FROM orchestration_ledgerhead", "DELETE on orchestration_ledgerhead"),
        ("TRUNCATE orchestration_ledgerhead", "TRUNCATE on orchestration_ledgerhead"),
    ],
)
@pytest.mark.parametrize("exits", [(), OLD_EXITS], ids=["plain", "with-0008s-exits-set"])
def test_raw_sql_cannot_change_or_remove_records_or_the_head(sql, error, exits):
    append_many(3)
    before = list(AuditRecord.objects.values_list("seq", "payload"))
    head = LedgerHead.objects.values_list("seq", "hash").get()
    with pytest.raises(DatabaseError, match=f"The audit ledger.*{error}"):
        run(sql, *exits)
    assert list(AuditRecord.objects.values_list("seq", "payload")) == before
    assert LedgerHead.objects.values_list("seq", "hash").get() == head


def test_only_the_latest_pruned_record_opens_deletion_below_its_boundary():
    append_many(5)
    append("ledger.pruned", payload={"below": 3})  # #6
    with pytest.raises(DatabaseError, match=r"record #3 is not below the boundary \(3\)"):
        run("DELETE FROM orchestration_auditrecord WHERE seq <= 3")
    with pytest.raises(DatabaseError, match=f"{REFUSED}: UPDATE on"):
        run("UPDATE orchestration_auditrecord SET actor = 'x' WHERE seq = 1")
    assert run("DELETE FROM orchestration_auditrecord WHERE seq < 3") == 2
    assert seqs() == [3, 4, 5, 6]

    # A boundary never reaches the record naming it: the latest one always stays.
    append("ledger.pruned", payload={"below": 100})  # #7
    with pytest.raises(DatabaseError, match=r"record #7 is not below the boundary \(7\)"):
        run("DELETE FROM orchestration_auditrecord")
    assert run("DELETE FROM orchestration_auditrecord WHERE seq < 7") == 4
    assert seqs() == [7]

    # A malformed boundary opens nothing.
    append("ledger.pruned", payload={"below": "8; DROP"})  # #8
    with pytest.raises(DatabaseError, match=r"record #7 is not below the boundary \(none\)"):
        run("DELETE FROM orchestration_auditrecord WHERE seq = 7")
    assert seqs() == [7, 8]


def test_the_applications_role_has_no_way_around_the_guard():
    """As a role with every privilege on the tables but neither their owner nor a superuser (how
    the application should connect), nothing removes, rewrites or reorders a record."""
    records = append_many(3)
    role = f"baton_ledger_app_{os.getpid()}"  # rolled back with the test's transaction
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE ROLE {role} NOLOGIN")
        cursor.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}")
        cursor.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}")
        cursor.execute(f"SET ROLE {role}")
    try:
        for sql, error in [
            ("DELETE FROM orchestration_auditrecord WHERE seq = 2", "record #2 is not below"),
            ("TRUNCATE orchestration_auditrecord", "TRUNCATE on"),
            ("SET LOCAL session_replication_role = replica", "permission denied"),
            ("ALTER TABLE orchestration_auditrecord DISABLE TRIGGER USER", "must be owner"),
            ("DROP TRIGGER baton_ledger_link ON orchestration_auditrecord", "must be owner"),
            ("UPDATE orchestration_ledgerhead SET seq = 0", "UPDATE on orchestration_ledgerhead"),
        ]:
            with pytest.raises(DatabaseError, match=error):
                run(sql, *OLD_EXITS)
        assert append().prev_hash == records[-1].hash  # appending is all it can do
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET ROLE")
    assert seqs() == [1, 2, 3, 4]


@pytest.mark.django_db(transaction=True)
def test_the_test_flush_passes_the_guard_as_a_superuser_only():
    append_many(3)
    with transaction.atomic(), connection.cursor() as cursor:
        for name, value in OLD_EXITS:
            cursor.execute("SELECT set_config(%s, %s, false)", [name, value])  # the session's
    with (
        pytest.raises(DatabaseError, match=f"{REFUSED}: TRUNCATE on"),
        connection.cursor() as cursor,
    ):
        cursor.execute("TRUNCATE orchestration_auditrecord, orchestration_ledgerhead")
    assert AuditRecord.objects.count() == 3

    # The database flush between transactional tests (tests/conftest.py) turns triggers off,
    # which takes a superuser: the tests connect as one, the application must not.
    call_command("flush", interactive=False, verbosity=0)
    assert AuditRecord.objects.count() == 0
    assert append().seq == 1


@pytest.mark.django_db(transaction=True)
def test_concurrent_writers_and_beat_keep_one_unbroken_chain(checkpoint_dir):
    writers, per_writer = 8, 50
    start = threading.Barrier(writers + 1)
    done = threading.Event()
    errors, verifications = [], []

    def write(n: int) -> None:
        try:
            start.wait()
            for i in range(per_writer):
                with transaction.atomic():
                    ledger_append("test.concurrent", payload={"writer": n, "i": i})
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            connections.close_all()

    def check() -> None:  # beat's check, over and over while the writers write
        try:
            start.wait()
            while not done.is_set():
                verifications.append(verify_and_checkpoint())
        except Exception as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    checker = threading.Thread(target=check)
    for thread in [*threads, checker]:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    checker.join()

    assert errors == []
    assert verifications and all(result.ok for result in verifications), [
        result.error for result in verifications if not result.ok
    ]
    total = writers * per_writer
    result = ledger_verify()
    assert result.ok, result.error
    assert result.checked == AuditRecord.objects.count() == total
    assert list(AuditRecord.objects.values_list("seq", flat=True)) == list(range(1, total + 1))
    assert verify_and_checkpoint().last_seq == total
    assert (checkpoint_dir / f"checkpoint-{total:020d}.json").exists()
    assert ledger_verify().checkpoints >= 2
