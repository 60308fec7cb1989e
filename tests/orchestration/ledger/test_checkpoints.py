"""Signed checkpoints, beat's periodic verification, and ``audit_verify`` against them."""

import json
import os
import threading

import pytest
from django.core.management import CommandError, call_command

from config.celery import app
from config.settings import celery_broker_url
from orchestration.ledger import last_verification
from orchestration.ledger.chain import ledger_verify
from orchestration.ledger.checkpoints import (
    CheckpointError,
    checkpoint_path,
    read_checkpoints,
    write_checkpoint,
)
from orchestration.ledger.models import LedgerHead, LedgerVerification
from orchestration.tasks import ledger_checkpoint
from tests.orchestration.ledger.conftest import append, append_many, rewrite_chain, tamper
from tests.services import wait_for

pytestmark = pytest.mark.django_db


def checkpoint_files(folder) -> list[str]:
    return sorted(path.name for path in folder.glob("*.json")) if folder.exists() else []


def test_the_beat_task_checkpoints_the_head_and_records_each_run(checkpoint_dir):
    records = append_many(3)
    assert ledger_checkpoint() is True

    assert checkpoint_files(checkpoint_dir) == ["checkpoint-00000000000000000003.json"]
    body = json.loads(checkpoint_path(3).read_text())
    assert (body["seq"], body["hash"]) == (3, records[-1].hash)
    run = last_verification()
    assert (run.source, run.ok, run.checked, run.first_seq, run.last_seq, run.last_hash) == (
        "beat",
        True,
        3,
        1,
        3,
        records[-1].hash,
    )

    # Nothing new: the run is recorded, no checkpoint is written.
    assert ledger_checkpoint() is True
    assert LedgerVerification.objects.count() == 2
    assert (last_verification().checked, last_verification().first_seq) == (0, None)
    assert len(checkpoint_files(checkpoint_dir)) == 1

    # Only the records after the last checkpoint are walked again.
    append_many(2)
    assert ledger_checkpoint() is True
    run = last_verification()
    assert (run.checked, run.first_seq, run.last_seq) == (2, 4, 5)
    assert checkpoint_files(checkpoint_dir)[-1] == "checkpoint-00000000000000000005.json"


def test_the_beat_task_reports_an_altered_record_after_the_checkpoint_and_writes_none(
    checkpoint_dir,
):
    append_many(3)
    ledger_checkpoint()
    append_many(2)
    tamper("UPDATE orchestration_auditrecord SET actor = %s WHERE seq = 5", ["mallory"])

    assert ledger_checkpoint() is False
    run = last_verification()
    assert not run.ok
    assert run.source == "beat"
    assert "#5 was altered" in run.error
    assert run.last_seq == 4
    assert checkpoint_files(checkpoint_dir) == ["checkpoint-00000000000000000003.json"]


def test_audit_verify_finds_an_altered_row_and_records_the_run():
    append_many(4)
    call_command("audit_verify")
    assert last_verification().ok

    tamper("UPDATE orchestration_auditrecord SET payload = %s WHERE seq = 2", ['{"n":1000}'])
    with pytest.raises(CommandError, match="#2 was altered"):
        call_command("audit_verify")
    run = last_verification()
    assert (run.source, run.ok, run.checked, run.last_seq) == ("command", False, 1, 1)
    assert "#2 was altered" in run.error


def test_a_rewritten_chain_is_caught_against_a_checkpoint(checkpoint_dir, tmp_path, settings):
    append_many(5)
    ledger_checkpoint()
    append_many(2)
    rewrite_chain(2, '{"n":1000}')

    # Consistent in itself: without the checkpoint nothing shows.
    settings.BATON_AUDIT_CHECKPOINT_DIR = tmp_path / "no-checkpoints"
    assert ledger_verify().ok
    settings.BATON_AUDIT_CHECKPOINT_DIR = checkpoint_dir

    with pytest.raises(CommandError, match="#5 differs from its signed checkpoint"):
        call_command("audit_verify")
    # Beat, which walks only what follows the checkpoint, sees the link broken.
    assert ledger_checkpoint() is False
    assert "#5 differs from its signed checkpoint" in last_verification().error


def test_a_cut_tail_is_caught_by_a_checkpoint_beyond_the_end(checkpoint_dir):
    records = append_many(5)
    ledger_checkpoint()
    tamper("DELETE FROM orchestration_auditrecord WHERE seq > 3")
    tamper("UPDATE orchestration_ledgerhead SET seq = 3, hash = %s WHERE id = 1", [records[2].hash])

    with pytest.raises(CommandError, match="checkpoint #5 lies beyond the chain's end #3"):
        call_command("audit_verify")
    assert ledger_checkpoint() is False
    assert "records were cut from its tail" in last_verification().error


@pytest.mark.parametrize(
    "change",
    ["hash", "seq", "signature", "garbage", "forged", "renamed"],
)
def test_an_altered_or_forged_checkpoint_is_reported(checkpoint_dir, change, settings):
    records = append_many(3)
    ledger_checkpoint()
    call_command("audit_verify")
    path = checkpoint_path(3)
    body = json.loads(path.read_text())
    if change == "hash":
        body["hash"] = records[1].hash
    elif change == "seq":
        body["seq"] = 2
    elif change == "signature":
        body["signature"] = "0" * 64
    elif change == "forged":  # signed, but with another key
        settings.BATON_AUDIT_KEY = "someone-elses-key-" + "x" * 30
        write_checkpoint(2, records[1].hash)
        settings.BATON_AUDIT_KEY = ""
    elif change == "renamed":
        path = path.rename(checkpoint_path(2))
    if change == "garbage":
        path.write_text("{not json")
    elif change not in ("forged", "renamed"):
        path.write_text(json.dumps(body))

    with pytest.raises(CommandError, match=r"checkpoint checkpoint-0+[23]\.json"):
        call_command("audit_verify")
    assert not last_verification().ok


def test_checkpoints_are_signed_with_the_configured_key(checkpoint_dir, settings):
    records = append_many(2)
    settings.BATON_AUDIT_KEY = "the-audit-key-" + "k" * 30
    write_checkpoint(2, records[1].hash)
    assert ledger_verify().ok
    assert ledger_verify().checkpoints == 1

    settings.BATON_AUDIT_KEY = ""  # back to the key derived from SECRET_KEY
    _, problems = read_checkpoints()
    assert problems == [
        "checkpoint checkpoint-00000000000000000002.json has an invalid signature: "
        "it was altered or forged"
    ]


def test_a_checkpoint_is_never_overwritten_with_another_hash(checkpoint_dir):
    records = append_many(2)
    first = write_checkpoint(2, records[1].hash)
    assert write_checkpoint(2, records[1].hash) == first
    with pytest.raises(CheckpointError, match="already says #2 has hash"):
        write_checkpoint(2, records[0].hash)
    assert json.loads(checkpoint_path(2).read_text())["hash"] == records[1].hash


def test_audit_verify_reports_checkpoints_and_a_broken_head(capsys):
    append_many(3)
    ledger_checkpoint()
    call_command("audit_verify")
    out = capsys.readouterr().out
    assert "Ledger intact: 3 records, head #3" in out
    assert "1 signed checkpoints match" in out

    tamper("UPDATE orchestration_ledgerhead SET seq = 9 WHERE id = 1")
    with pytest.raises(CommandError, match="the chain ends at #3 but its head says #9"):
        call_command("audit_verify")
    assert LedgerHead.objects.get().seq == 9


def test_beat_schedules_the_ledger_tasks(settings):
    schedule = settings.CELERY_BEAT_SCHEDULE
    app.loader.import_default_modules()
    for entry in ("ledger-checkpoint", "ledger-prune"):
        assert schedule[entry]["task"] in app.tasks
    assert schedule["ledger-checkpoint"]["schedule"] == settings.BATON_AUDIT_CHECKPOINT_MINUTES * 60


def test_last_verification_is_the_latest_run():
    assert last_verification() is None
    append()
    call_command("audit_verify")
    ledger_checkpoint()
    assert last_verification().source == "beat"


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_a_celery_worker_runs_the_beat_task(checkpoint_dir, celery_worker, redis_url):
    _, process = celery_worker
    records = append_many(4)
    with app.connection_for_write(celery_broker_url(redis_url)) as conn:
        app.send_task("orchestration.tasks.ledger_checkpoint", connection=conn)

    def recorded():
        assert process.poll() is None, process.log_path.read_text()
        return last_verification()

    run = wait_for(recorded, timeout=30, what="the worker's verification run")
    assert (run.source, run.ok, run.checked, run.last_seq) == ("beat", True, 4, 4)
    assert json.loads(checkpoint_path(4).read_text())["hash"] == records[-1].hash


def test_checkpoints_signed_before_a_secret_key_rotation_stay_valid(checkpoint_dir, settings):
    settings.BATON_AUDIT_KEY = ""
    old_secret = settings.SECRET_KEY
    records = append_many(4)
    write_checkpoint(2, records[1].hash)
    assert ledger_verify().checkpoints == 1

    settings.SECRET_KEY = "the-rotated-secret-key-" + "r" * 40
    settings.SECRET_KEY_FALLBACKS = [old_secret]
    verified = ledger_verify()
    assert verified.ok, verified.error
    write_checkpoint(4, records[3].hash)  # new checkpoints: signed with the current key
    assert write_checkpoint(2, records[1].hash).at == read_checkpoints()[0][0].at
    verified = ledger_verify()
    assert verified.ok, verified.error
    assert verified.checkpoints == 2

    # Once the old key is dropped from the fallbacks, only the checkpoint signed with it fails.
    settings.SECRET_KEY_FALLBACKS = []
    valid, problems = read_checkpoints()
    assert [checkpoint.seq for checkpoint in valid] == [4]
    assert problems == [
        "checkpoint checkpoint-00000000000000000002.json has an invalid signature: "
        "it was altered or forged"
    ]
    # The fallbacks are SECRET_KEY's: with BATON_AUDIT_KEY set, only that key signs.
    settings.SECRET_KEY_FALLBACKS = [old_secret]
    settings.BATON_AUDIT_KEY = "the-audit-key-" + "k" * 30
    assert len(read_checkpoints()[1]) == 2


def test_a_concurrent_writer_of_the_same_checkpoint_is_no_error(checkpoint_dir, monkeypatch):
    records = append_many(2)
    fsync, started, raced = os.fsync, [], []

    def fsync_after_another_writer(fd):
        # Another writer (a second beat check) writes the same checkpoint in the meantime.
        if not started:
            started.append(fd)
            raced.append(write_checkpoint(2, records[1].hash))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_after_another_writer)
    written = write_checkpoint(2, records[1].hash)
    monkeypatch.setattr(os, "fsync", fsync)
    assert (written.seq, written.hash) == (raced[0].seq, raced[0].hash) == (2, records[1].hash)
    assert sorted(path.name for path in checkpoint_dir.iterdir()) == [
        "checkpoint-00000000000000000002.json"
    ]
    assert ledger_verify().ok

    # A concurrent writer of another hash for the same sequence is still an error.
    started.clear()

    def fsync_after_a_different_writer(fd):
        if not started:
            started.append(fd)
            write_checkpoint(3, records[0].hash)
        return fsync(fd)

    append()
    monkeypatch.setattr(os, "fsync", fsync_after_a_different_writer)
    with pytest.raises(CheckpointError, match="already says #3 has hash"):
        write_checkpoint(3, LedgerHead.objects.get().hash)
    monkeypatch.setattr(os, "fsync", fsync)
    assert not [path for path in checkpoint_dir.iterdir() if path.suffix == ".partial"]


def test_many_writers_of_the_same_checkpoint_at_once_all_succeed(checkpoint_dir):
    records = append_many(3)
    barrier, errors, results = threading.Barrier(8), [], []

    def writer():
        barrier.wait()
        try:
            results.append(write_checkpoint(3, records[2].hash))
        except CheckpointError as exc:  # pragma: no cover - the defect
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert {(result.seq, result.hash) for result in results} == {(3, records[2].hash)}
    assert sorted(path.name for path in checkpoint_dir.iterdir()) == [
        "checkpoint-00000000000000000003.json"
    ]
