"""Verification runs, recorded: beat's periodic check of the records since the last checkpoint
(which then checkpoints the new head), and ``audit_verify``'s check of the whole chain against
every checkpoint."""

import logging
from dataclasses import replace

from orchestration.ledger.chain import VerifyResult, ledger_verify
from orchestration.ledger.checkpoints import CheckpointError, latest_checkpoint, write_checkpoint
from orchestration.ledger.models import LedgerVerification

logger = logging.getLogger(__name__)


def verify_ledger(*, source: str = "command") -> VerifyResult:
    """The whole chain and every signed checkpoint; the run is recorded."""
    result = ledger_verify()
    _record(result, source)
    return result


def verify_and_checkpoint() -> VerifyResult:
    """Beat's check: the records since the latest checkpoint must link to it and be intact; if
    they are and the head advanced past it, the head is checkpointed. The run is recorded."""
    result = ledger_verify(since_last_checkpoint=True)
    if result.ok and result.last_seq > 0:
        try:
            latest = latest_checkpoint()
            if latest is None or result.last_seq > latest.seq:
                write_checkpoint(result.last_seq, result.last_hash)
        except CheckpointError as exc:
            result = replace(result, ok=False, error=f"checkpoint not written: {exc}")
    _record(result, "beat")
    return result


def _record(result: VerifyResult, source: str) -> LedgerVerification:
    if not result.ok:
        logger.error("Audit ledger verification (%s) failed: %s", source, result.error)
    return LedgerVerification.objects.create(
        ok=result.ok,
        source=source,
        checked=result.checked,
        first_seq=result.first_seq if result.checked else None,
        last_seq=result.last_seq,
        last_hash=result.last_hash,
        error=result.error,
    )
