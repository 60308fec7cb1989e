import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.db import transaction

from orchestration.ledger.actor import acting_as
from orchestration.ledger.chain import ledger_append, ledger_verify
from orchestration.ledger.models import GENESIS_HASH, AuditRecord, LedgerError, LedgerHead
from tests.orchestration.ledger.conftest import tamper

pytestmark = pytest.mark.django_db


def append(verb="test.happened", **kwargs):
    with transaction.atomic():
        return ledger_append(verb, **kwargs)


def test_records_form_one_linked_chain():
    first = append(payload={"n": 1}, actor="system")
    second = append(payload={"n": 2}, run_id=7)
    assert second.seq == first.seq + 1
    assert first.prev_hash == GENESIS_HASH
    assert second.prev_hash == first.hash
    assert LedgerHead.objects.get().hash == second.hash
    assert ledger_verify().ok


def test_payload_is_stored_as_canonical_text():
    record = append(payload={"b": 1.0, "a": "x"})
    record.refresh_from_db()
    assert record.payload == '{"a":"x","b":1}'


@pytest.mark.django_db(transaction=True)
def test_append_outside_a_transaction_is_refused():
    with pytest.raises(LedgerError, match="inside the caller's transaction"):
        ledger_append("test.happened")
    assert not AuditRecord.objects.exists()


def test_a_malformed_verb_is_refused():
    with pytest.raises(LedgerError, match="dotted lower-case"):
        append("Login")


def test_agent_text_with_nul_is_refused_and_the_callers_change_rolls_back():
    User = get_user_model()
    nul = r"payload\.reasoning contains a NUL character"
    with pytest.raises(LedgerError, match=nul), transaction.atomic():
        User.objects.create_user("nobody")
        ledger_append("agent.said", payload={"reasoning": "refund\x00all"})
    assert not User.objects.filter(username="nobody").exists()
    assert not AuditRecord.objects.filter(verb="agent.said").exists()


def test_actor_defaults_to_the_current_actor_and_accepts_users():
    user = get_user_model().objects.create_user("ada")
    with acting_as(user):
        record = append()
    assert (record.actor, record.actor_user_id) == ("ada", user.pk)
    assert append().actor == "system"


def test_the_orm_refuses_updates_and_deletes():
    record = append()
    record.verb = "test.rewritten"
    with pytest.raises(LedgerError, match="append-only"):
        record.save()
    with pytest.raises(LedgerError, match="append-only"):
        record.delete()
    with pytest.raises(LedgerError, match="append-only"):
        AuditRecord.objects.filter(pk=record.pk).update(verb="test.rewritten")
    with pytest.raises(LedgerError, match="append-only"):
        AuditRecord.objects.all().delete()


@pytest.mark.parametrize(
    ("sql", "error"),
    [
        ("UPDATE orchestration_auditrecord SET payload = %s WHERE seq = 2", "#2 was altered"),
        ("UPDATE orchestration_auditrecord SET actor = %s WHERE seq = 2", "#2 was altered"),
        ("DELETE FROM orchestration_auditrecord WHERE seq = 2 AND %s <> ''", "sequence gap"),
        ("DELETE FROM orchestration_auditrecord WHERE seq = 3 AND %s <> ''", "head says #3"),
    ],
)
def test_audit_verify_fails_at_the_first_broken_link(sql, error):
    for n in range(3):
        append(payload={"amount": n})
    call_command("audit_verify")  # intact

    tamper(sql, ['{"amount":1000}'])
    with pytest.raises(CommandError, match=error):
        call_command("audit_verify")


def test_audit_verify_reports_an_intact_chain(capsys):
    append()
    call_command("audit_verify")
    assert "Ledger intact: 1 records, head #1" in capsys.readouterr().out
