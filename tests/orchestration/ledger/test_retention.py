"""Pruning records past their retention period, anchored by a signed checkpoint."""

import hashlib
import hmac
import json
import time
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from django.utils import timezone

from orchestration.canonical import canonical_json
from orchestration.ledger import last_verification
from orchestration.ledger.chain import ledger_append, ledger_verify
from orchestration.ledger.checkpoints import (
    KEY_LABEL,
    CheckpointError,
    checkpoint_at,
    checkpoint_path,
    write_checkpoint,
)
from orchestration.ledger.models import AuditRecord, LedgerError, LedgerVerification
from orchestration.ledger.retention import ledger_prune
from orchestration.tasks import ledger_checkpoint
from orchestration.tasks import ledger_prune as ledger_prune_task
from tests.orchestration.ledger.conftest import append_many, backdate, tamper

pytestmark = pytest.mark.django_db

DAYS = 183


def old_and_new(old: int, new: int):
    """``old`` records, then ``new`` ones; returns the time between them as if it were the
    retention period ago (``now`` for pruning)."""
    append_many(old)
    time.sleep(0.002)
    middle = timezone.now()
    time.sleep(0.002)
    append_many(new)
    return middle + timedelta(days=DAYS)


def seqs() -> list[int]:
    return list(AuditRecord.objects.values_list("seq", flat=True))


def test_pruning_deletes_old_records_and_verification_stays_green(checkpoint_dir):
    now = old_and_new(5, 3)
    ledger_checkpoint()  # an older checkpoint, #8
    old_run = LedgerVerification.objects.create(
        ok=True, source="beat", at=now - timedelta(days=DAYS + 1)
    )

    anchor = AuditRecord.objects.get(seq=5).hash
    result = ledger_prune(retention_days=DAYS, now=now)
    assert not LedgerVerification.objects.filter(pk=old_run.pk).exists()
    assert LedgerVerification.objects.count() == 1  # beat's run above

    assert (result.deleted, result.keep_from, result.checkpoint.seq) == (5, 6, 5)
    assert seqs() == [6, 7, 8, 9]
    assert checkpoint_path(5).exists()
    # The pruning's own record, in the chain: what went, up to where, under which retention.
    pruned = AuditRecord.objects.get(seq=9)
    assert (pruned.verb, pruned.actor, pruned.object_id) == ("ledger.pruned", "system", "6")
    assert json.loads(pruned.payload) == {
        "below": 6,
        "from": 1,
        "anchor_hash": anchor,
        "cutoff": (now - timedelta(days=DAYS)).isoformat(),
        "retention_days": DAYS,
    }
    verified = ledger_verify()
    assert verified.ok, verified.error
    assert (verified.first_seq, verified.checked, verified.checkpoints) == (6, 4, 2)
    call_command("audit_verify")

    # The chain goes on from where it was, and beat keeps checkpointing it.
    append_many(2)
    assert ledger_checkpoint() is True
    assert ledger_verify().ok
    assert ledger_verify().last_seq == 11


def test_pruning_again_moves_the_anchor_and_drops_older_checkpoints(checkpoint_dir):
    now = old_and_new(3, 3)
    ledger_prune(retention_days=DAYS, now=now)  # #1-#3 go, its record is #7
    ledger_checkpoint()  # #7
    time.sleep(0.002)
    later = timezone.now()
    time.sleep(0.002)
    append_many(2)

    result = ledger_prune(retention_days=DAYS, now=later + timedelta(days=DAYS))

    assert (result.deleted, result.keep_from) == (4, 8)  # the first pruning's record goes too
    assert seqs() == [8, 9, 10]
    assert [path.name for path in sorted(checkpoint_dir.glob("*.json"))] == [
        "checkpoint-00000000000000000007.json"
    ]
    assert ledger_verify().ok


def test_the_last_record_always_stays(checkpoint_dir):
    append_many(4)
    result = ledger_prune(retention_days=DAYS, now=timezone.now() + timedelta(days=DAYS + 1))
    assert (result.deleted, result.keep_from) == (3, 4)
    assert seqs() == [4, 5]  # and the pruning's record after it
    assert ledger_verify().ok


def test_nothing_is_pruned_within_retention_or_with_retention_off(checkpoint_dir):
    append_many(3)
    assert ledger_prune(retention_days=DAYS).deleted == 0
    assert ledger_prune(retention_days=0, now=timezone.now() + timedelta(days=999)).deleted == 0
    assert seqs() == [1, 2, 3]
    assert not checkpoint_dir.exists()


def test_pruning_refuses_to_delete_without_a_checkpoint(checkpoint_dir):
    now = old_and_new(3, 2)
    checkpoint_dir.write_text("not a folder")  # the checkpoint cannot be written

    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        ledger_prune(retention_days=DAYS, now=now)
    assert seqs() == [1, 2, 3, 4, 5]
    backdate(4, timezone.now() - timedelta(days=DAYS + 1))
    with pytest.raises(CommandError, match="cannot write checkpoint"):
        call_command("audit_prune")
    assert seqs() == [1, 2, 3, 4, 5]


def test_pruning_refuses_a_broken_chain(checkpoint_dir):
    now = old_and_new(3, 2)
    tamper("UPDATE orchestration_auditrecord SET actor = %s WHERE seq = 2", ["mallory"])

    with pytest.raises(LedgerError, match="Refused to prune: the ledger is broken: #2 was altered"):
        ledger_prune(retention_days=DAYS, now=now)
    assert seqs() == [1, 2, 3, 4, 5]
    assert not checkpoint_dir.exists()


def test_a_pruned_chain_without_its_checkpoint_fails_verification(checkpoint_dir):
    now = old_and_new(3, 2)
    ledger_prune(retention_days=DAYS, now=now)
    checkpoint_path(3).unlink()

    result = ledger_verify()
    assert not result.ok
    assert "records up to #3 are gone and no valid signed checkpoint of #3" in result.error


def test_deleting_old_records_by_hand_is_caught(checkpoint_dir):
    append_many(4)
    tamper("DELETE FROM orchestration_auditrecord WHERE seq < 3")
    with pytest.raises(CommandError, match="records up to #2 are gone"):
        call_command("audit_verify")


def test_audit_prune_command_and_beat_task(checkpoint_dir, settings, capsys):
    append_many(6)
    call_command("audit_prune")
    assert "Nothing to prune." in capsys.readouterr().out

    backdate(3, timezone.now() - timedelta(days=DAYS + 1))
    call_command("audit_prune")
    out = capsys.readouterr().out
    assert "Pruned 2 records below #3; signed checkpoint of #2" in out
    assert seqs() == [3, 4, 5, 6, 7]

    backdate(5, timezone.now() - timedelta(days=31))
    settings.BATON_AUDIT_RETENTION_DAYS = 0
    assert ledger_prune_task() == 0
    settings.BATON_AUDIT_RETENTION_DAYS = 30
    assert ledger_prune_task() == 2
    assert seqs() == [5, 6, 7, 8]
    call_command("audit_verify")


def delete_through_the_prune_exit(below: int) -> None:
    """``DELETE ... WHERE seq < below`` as the application's database role could: through the
    database's one exit, a ``ledger.pruned`` record naming the boundary, appended first (on
    PostgreSQL; SQLite has no such guard). The record stays; the prune checkpoint, which takes
    the signing key, is missing."""
    with transaction.atomic(), connection.cursor() as cursor:
        ledger_append("ledger.pruned", payload={"below": below})
        cursor.execute("DELETE FROM orchestration_auditrecord WHERE seq < %s", [below])


def test_deleting_the_oldest_records_up_to_a_periodic_checkpoint_is_caught(checkpoint_dir):
    append_many(5)
    assert ledger_checkpoint() is True  # beat's periodic checkpoint of #5
    append_many(3)
    assert ledger_checkpoint() is True  # and of #8
    delete_through_the_prune_exit(6)
    assert seqs() == [6, 7, 8, 9]

    result = ledger_verify()
    assert not result.ok
    assert "records up to #5 are gone" in result.error
    assert "no pruning's signed checkpoint" in result.error
    with pytest.raises(CommandError, match="records up to #5 are gone"):
        call_command("audit_verify")
    assert not last_verification().ok


def test_deleting_up_to_a_record_below_a_periodic_checkpoint_is_caught(checkpoint_dir):
    append_many(3)
    ledger_checkpoint()  # periodic #3
    append_many(3)
    ledger_checkpoint()  # periodic #6
    delete_through_the_prune_exit(5)

    result = ledger_verify()
    assert not result.ok
    assert "records up to #4 are gone" in result.error
    assert "checkpoint #3" in result.error


def test_a_checkpoint_from_before_kinds_existed_is_periodic(checkpoint_dir, settings):
    records = append_many(4)
    key = hmac.new(settings.SECRET_KEY.encode(), KEY_LABEL, hashlib.sha256).digest()
    at = "2025-01-01T00:00:00.000000+00:00"
    text = canonical_json({"seq": 2, "hash": records[1].hash, "at": at}).encode()
    signature = hmac.new(key, text, hashlib.sha256).hexdigest()
    body = {"seq": 2, "hash": records[1].hash, "at": at, "signature": signature}
    checkpoint_dir.mkdir()
    checkpoint_path(2).write_text(json.dumps(body))
    assert checkpoint_at(2).kind == "periodic"
    assert ledger_verify().ok
    assert ledger_verify().checkpoints == 1

    delete_through_the_prune_exit(3)
    assert "records up to #2 are gone" in ledger_verify().error

    # Nor can the old file be passed off as a pruning's by adding the field.
    checkpoint_path(2).write_text(json.dumps({**body, "kind": "prune"}))
    assert checkpoint_at(2) is None
    assert not ledger_verify().ok


def test_pruning_at_a_periodic_checkpoint_makes_it_a_prune_checkpoint(checkpoint_dir):
    now = old_and_new(5, 3)
    assert ledger_checkpoint() is True  # periodic #8
    write_checkpoint(5, AuditRecord.objects.get(seq=5).hash)  # periodic #5, the boundary
    assert checkpoint_at(5).kind == "periodic"

    result = ledger_prune(retention_days=DAYS, now=now)
    assert (result.deleted, result.keep_from, result.checkpoint.kind) == (5, 6, "prune")
    assert json.loads(checkpoint_path(5).read_text())["kind"] == "prune"
    assert checkpoint_at(8).kind == "periodic"
    verified = ledger_verify()
    assert verified.ok, verified.error
    assert (verified.first_seq, verified.checkpoints) == (6, 2)
    # A periodic checkpoint never replaces the prune one.
    assert write_checkpoint(5, result.checkpoint.hash).kind == "prune"


def test_older_checkpoints_left_by_an_interrupted_pruning_are_anchored_by_it(
    checkpoint_dir, monkeypatch
):
    append_many(2)
    ledger_checkpoint()  # periodic #2
    now = old_and_new(2, 2)
    monkeypatch.setattr(
        "orchestration.ledger.retention.remove_checkpoints_below", lambda seq: 0
    )  # as if the pruning stopped right after deleting
    assert ledger_prune(retention_days=DAYS, now=now).keep_from == 5
    assert checkpoint_path(2).exists()
    verified = ledger_verify()
    assert verified.ok, verified.error
    assert verified.first_seq == 5
