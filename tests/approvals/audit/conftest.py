"""Accounts by role and ledger records for the auditor's pages."""

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import transaction
from django.test import Client
from django.utils import timezone

from approvals.roles import AUDITOR
from orchestration.ledger.chain import ledger_append, record_digest
from orchestration.ledger.models import AuditRecord, LedgerHead
from orchestration.registry.models import Agent

HX = {"HTTP_HX_REQUEST": "true"}


def account(name: str, role: str | None = None):
    user = get_user_model().objects.create_user(name, password=f"pw-{name}-12345")
    if role:
        user.groups.add(Group.objects.get(name=role))
    return user


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def append(verb: str = "test.event", **fields) -> AuditRecord:
    """One record through the real ledger (its own transaction)."""
    fields.setdefault("actor", "system")
    with transaction.atomic():
        return ledger_append(verb, **fields)


def bulk_records(n: int, *, at_step: timedelta = timedelta(0), **fields) -> tuple[int, int]:
    """``n`` records appended fast: a valid chain computed here and inserted in batches (each
    insert moves the head, as for ``ledger_append``). All at one instant, or
    ``at_step`` apart (negative: time running backwards, as concurrent writers can make it for
    a few milliseconds). Returns the first and last ``seq``."""
    head, _ = LedgerHead.objects.get_or_create(pk=1)  # a flushed database has none yet
    prev_hash, seq, first = head.hash, head.seq, head.seq + 1
    now = timezone.now()
    references = {
        "run_id": None,
        "agent_id": None,
        "approval_id": None,
        "user_id": None,
        "object_type": "",
        "object_id": "",
        "workflow": "",
        "tool": "",
        "outcome": "",
        "risk": None,
        "reason": "",
    }
    batch = []
    with transaction.atomic():
        for i in range(n):
            seq += 1
            at = now + i * at_step
            refs = {**references, **fields, "reason": f"{fields.get('reason', 'bulk')} {i}"}
            payload = f'{{"i":{i},"note":"bulk record for the export test"}}'
            digest = record_digest(
                prev_hash=prev_hash,
                seq=seq,
                at=at,
                actor="system",
                actor_user_id=None,
                verb="test.bulk",
                payload=payload,
                **refs,
            )
            batch.append(
                AuditRecord(
                    seq=seq,
                    at=at,
                    actor="system",
                    verb="test.bulk",
                    payload=payload,
                    prev_hash=prev_hash,
                    hash=digest,
                    **refs,
                )
            )
            prev_hash = digest
            if len(batch) == 2000:
                AuditRecord.objects.bulk_create(batch)
                batch = []
        AuditRecord.objects.bulk_create(batch)  # each insert advances the head (migration 0011)
    return first, seq


@pytest.fixture
def auditor():
    return account("audrey", AUDITOR)


@pytest.fixture
def auditor_client(auditor):
    return client_for(auditor)


@pytest.fixture
def agents():
    return {name: Agent.objects.create(name=name) for name in ("refund-bot", "mail-bot")}


def corpus(agents) -> list[AuditRecord]:
    """Records varied on every searchable column, oldest first."""
    refund, mail = agents["refund-bot"].pk, agents["mail-bot"].pk
    rows = [
        (
            "policy.allow",
            "policy-gate",
            "customer_refund",
            "orders.lookup",
            "allow",
            5,
            refund,
            "risk 5 is below supervised's allow threshold",
        ),
        (
            "policy.ask",
            "policy-gate",
            "customer_refund",
            "payments.refund",
            "ask",
            72,
            refund,
            "rule Large refunds need finance",
        ),
        (
            "approval.decided",
            "dana",
            "customer_refund",
            "payments.refund",
            "approve",
            72,
            refund,
            "Checked the order: the blender arrived broken",
        ),
        (
            "policy.deny",
            "policy-gate",
            "customer_refund",
            "payments.refund",
            "deny",
            91,
            refund,
            "risk 91 is above supervised's deny threshold",
        ),
        (
            "approval.decided",
            "omar",
            "newsletter",
            "email.send",
            "reject",
            45,
            mail,
            "Customer asked twice not to be mailed",
        ),
        (
            "policy.ask",
            "policy-gate",
            "newsletter",
            "email.send",
            "ask",
            45,
            mail,
            "rule Mail outside needs operations",
        ),
        (
            "approval.decided",
            "dana",
            "newsletter",
            "email.send",
            "halt",
            64,
            mail,
            "The agent is mailing everyone twice",
        ),
        ("run.started", "system", "newsletter", "", "started", None, mail, ""),
        (
            "approval.decided",
            "omar",
            "customer_refund",
            "payments.refund",
            "edit",
            38,
            refund,
            "Refund only the blender, not the shipping: finance agreed",
        ),
        ("account.login", "dana", "", "", "", None, None, ""),
        (
            "policy.allow",
            "policy-gate",
            "newsletter",
            "email.send",
            "allow",
            12,
            mail,
            "allowed similar by dana",
        ),
        ("run.completed", "system", "customer_refund", "", "completed", None, refund, ""),
    ]
    records = []
    for verb, actor, workflow, tool, outcome, risk, agent_id, reason in rows:
        records.append(
            append(
                verb,
                actor=actor,
                workflow=workflow,
                tool=tool,
                outcome=outcome,
                risk=risk,
                agent_id=agent_id,
                reason=reason,
                run_id=7 if workflow == "customer_refund" else (8 if workflow else None),
                payload={"n": len(records)},
            )
        )
    return records
