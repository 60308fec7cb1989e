"""PostgreSQL refuses UPDATE, DELETE and TRUNCATE of audit records (migration 0008), except
through its two narrow exits, and keeps one chain under concurrent writers."""

import threading

import pytest
from django.core.management import call_command
from django.db import DatabaseError, connection, connections, transaction

from orchestration.ledger.chain import ledger_append, ledger_verify
from orchestration.ledger.models import AuditRecord
from orchestration.ledger.verification import verify_and_checkpoint
from tests.orchestration.ledger.conftest import append_many

pytestmark = [pytest.mark.postgres, pytest.mark.django_db]

REFUSED = "The audit ledger is append-only"


def run(sql: str, *settings_: tuple[str, str]) -> int:
    """``sql`` in a transaction (a savepoint inside the test's) with the given local settings;
    returns the row count, or raises the database's error."""
    with transaction.atomic(), connection.cursor() as cursor:
        for name, value in settings_:
            cursor.execute("SELECT set_config(%s, %s, true)", [name, value])
        cursor.execute(sql)
        count = cursor.rowcount
        for name, _ in settings_:
            cursor.execute("SELECT set_config(%s, '', true)", [name])
        return count


def payloads() -> list[tuple[int, str]]:
    return list(AuditRecord.objects.values_list("seq", "payload"))


@pytest.mark.parametrize(
    ("sql", "error"),
    [
        ("UPDATE orchestration_auditrecord SET payload = '{}' WHERE seq = 2", "UPDATE on"),
        ("DELETE FROM orchestration_auditrecord WHERE seq = 2", "DELETE on"),
        ("DELETE FROM orchestration_auditrecord", "DELETE on"),
        ("TRUNCATE orchestration_auditrecord", "TRUNCATE on"),
        ("TRUNCATE orchestration_auditrecord, orchestration_ledgerhead CASCADE", "TRUNCATE on"),
    ],
)
def test_raw_sql_cannot_change_or_remove_records(sql, error):
    append_many(3)
    before = payloads()
    with pytest.raises(DatabaseError, match=f"{REFUSED}: {error}"):
        run(sql)
    assert payloads() == before


def test_the_pruning_exit_allows_exactly_the_records_below_its_boundary():
    append_many(5)
    prune = ("baton.ledger_prune_below", "3")

    with pytest.raises(DatabaseError, match=r"record #3 is not below the pruning boundary 3"):
        run("DELETE FROM orchestration_auditrecord WHERE seq <= 3", prune)
    with pytest.raises(DatabaseError, match=f"{REFUSED}: UPDATE on"):
        run("UPDATE orchestration_auditrecord SET actor = 'x' WHERE seq = 1", prune)
    with pytest.raises(DatabaseError, match=f"{REFUSED}: TRUNCATE on"):
        run("TRUNCATE orchestration_auditrecord", prune)
    with pytest.raises(DatabaseError, match=REFUSED):
        run("DELETE FROM orchestration_auditrecord WHERE seq < 2", (prune[0], "2; DROP"))
    assert [seq for seq, _ in payloads()] == [1, 2, 3, 4, 5]

    assert run("DELETE FROM orchestration_auditrecord WHERE seq < 3", prune) == 2
    assert [seq for seq, _ in payloads()] == [3, 4, 5]
    # The exit was closed again: the same transaction can delete nothing more.
    with pytest.raises(DatabaseError, match=REFUSED):
        run("DELETE FROM orchestration_auditrecord WHERE seq = 3")


def test_the_test_teardown_exit_allows_removal_but_never_updates():
    append_many(3)
    teardown = ("baton.ledger_exit", "test-teardown")
    with pytest.raises(DatabaseError, match=f"{REFUSED}: UPDATE on"):
        run("UPDATE orchestration_auditrecord SET actor = 'x'", teardown)
    with pytest.raises(DatabaseError, match=f"{REFUSED}: DELETE on"):
        run("DELETE FROM orchestration_auditrecord", ("baton.ledger_exit", "something-else"))
    assert run("DELETE FROM orchestration_auditrecord WHERE seq = 3", teardown) == 1
    run("TRUNCATE orchestration_auditrecord", teardown)
    assert payloads() == []


@pytest.mark.django_db(transaction=True)
def test_exits_end_with_their_transaction_and_the_test_flush_uses_its_own():
    append_many(3)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL baton.ledger_prune_below = '3'")
        cursor.execute("SET LOCAL baton.ledger_exit = 'test-teardown'")
    with (
        pytest.raises(DatabaseError, match=f"{REFUSED}: DELETE on"),
        connection.cursor() as cursor,
    ):
        cursor.execute("DELETE FROM orchestration_auditrecord WHERE seq = 1")
    assert AuditRecord.objects.count() == 3

    # The database flush between transactional tests (tests/conftest.py) opens the exit.
    call_command("flush", interactive=False, verbosity=0)
    assert AuditRecord.objects.count() == 0


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
