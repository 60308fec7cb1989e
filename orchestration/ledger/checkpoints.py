"""Signed checkpoints: the chain's sequence and hash at a moment, kept outside the database.

A checkpoint is one small JSON file in ``BATON_AUDIT_CHECKPOINT_DIR``, named after its sequence,
holding ``seq``, ``hash``, ``at`` (when it was written) and ``signature``: HMAC-SHA256 over the
canonical JSON of the other three, with ``BATON_AUDIT_KEY`` (or, when that is unset, a key
derived from ``SECRET_KEY`` under a fixed label). Someone who can rewrite the database but not
this folder and the key cannot rewrite the chain up to a checkpoint (every hash recomputed) or cut
its tail without verification noticing; and a checkpoint cannot be altered or forged without the
key.
"""

import hashlib
import hmac
import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from orchestration.canonical import canonical_json

KEY_LABEL = b"baton.ledger.checkpoint-key.v1"
FILE_RE = re.compile(r"^checkpoint-(\d{20})\.json$")
HASH_RE = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(Exception):
    """A checkpoint file that cannot be trusted, or one that cannot be written."""


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    hash: str
    at: str  # ISO 8601, UTC, microseconds
    path: Path


def checkpoint_dir() -> Path:
    return Path(settings.BATON_AUDIT_CHECKPOINT_DIR)


def checkpoint_path(seq: int) -> Path:
    return checkpoint_dir() / f"checkpoint-{seq:020d}.json"


def _key() -> bytes:
    key = getattr(settings, "BATON_AUDIT_KEY", "")
    if key:
        return key.encode()
    return hmac.new(settings.SECRET_KEY.encode(), KEY_LABEL, hashlib.sha256).digest()


def _signature(seq: int, hash_: str, at: str) -> str:
    text = canonical_json({"seq": seq, "hash": hash_, "at": at})
    return hmac.new(_key(), text.encode(), hashlib.sha256).hexdigest()


def write_checkpoint(seq: int, hash_: str, *, at: datetime | None = None) -> Checkpoint:
    """Write (durably) the checkpoint of ``seq``. Writing the same checkpoint again is a no-op;
    a different hash for a sequence already checkpointed is refused, never overwritten."""
    if seq < 1 or not HASH_RE.match(hash_):
        raise CheckpointError(f"refused to write a checkpoint of #{seq} with hash {hash_!r}")
    path = checkpoint_path(seq)
    if path.exists():
        existing = read_checkpoint(path)
        if existing.hash != hash_:
            raise CheckpointError(
                f"{path.name} already says #{seq} has hash {existing.hash[:16]}, "
                f"not {hash_[:16]}: the chain changed since that checkpoint"
            )
        return existing
    stamp = (at or timezone.now()).astimezone(UTC).isoformat(timespec="microseconds")
    body = {"seq": seq, "hash": hash_, "at": stamp, "signature": _signature(seq, hash_, stamp)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        with open(partial, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(body, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {exc}") from exc
    return read_checkpoint(path)


def read_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint in ``path``; raises ``CheckpointError`` unless it is well formed, named
    after its own sequence and signed with this installation's key."""
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path.name} cannot be read: {exc}") from exc
    if not isinstance(body, dict) or set(body) != {"seq", "hash", "at", "signature"}:
        raise CheckpointError(f"checkpoint {path.name} is malformed")
    seq, hash_, at, signature = body["seq"], body["hash"], body["at"], body["signature"]
    if not (type(seq) is int and isinstance(hash_, str) and isinstance(at, str)):
        raise CheckpointError(f"checkpoint {path.name} is malformed")
    if not isinstance(signature, str) or not hmac.compare_digest(
        signature, _signature(seq, hash_, at)
    ):
        raise CheckpointError(
            f"checkpoint {path.name} has an invalid signature: it was altered or forged"
        )
    if path.name != f"checkpoint-{seq:020d}.json":
        raise CheckpointError(f"checkpoint {path.name} holds #{seq}: it was renamed")
    return Checkpoint(seq=seq, hash=hash_, at=at, path=path)


def _files() -> list[Path]:
    folder = checkpoint_dir()
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if path.name.endswith(".json"))


def read_checkpoints() -> tuple[list[Checkpoint], list[str]]:
    """Every checkpoint, by sequence, and a description of every file that is not a valid one."""
    valid, problems = [], []
    for path in _files():
        try:
            valid.append(read_checkpoint(path))
        except FileNotFoundError:  # removed by pruning meanwhile
            continue
        except CheckpointError as exc:
            if path.exists():
                problems.append(str(exc))
    return sorted(valid, key=lambda checkpoint: checkpoint.seq), problems


def latest_checkpoint() -> Checkpoint | None:
    """The checkpoint with the highest sequence; raises ``CheckpointError`` if that file is not
    a valid checkpoint (it is never skipped for an older one)."""
    files = _files()
    if not files:
        return None
    named = [path for path in files if FILE_RE.match(path.name)]
    if len(named) != len(files):
        stray = next(path for path in files if not FILE_RE.match(path.name))
        raise CheckpointError(f"{stray.name} in the checkpoint folder is not a checkpoint")
    return read_checkpoint(named[-1])


def checkpoint_at(seq: int) -> Checkpoint | None:
    """The valid checkpoint of ``seq``, if there is one."""
    path = checkpoint_path(seq)
    try:
        return read_checkpoint(path)
    except CheckpointError:
        return None


def remove_checkpoints_below(seq: int) -> int:
    """Remove the checkpoints of sequences below ``seq`` (their records were pruned)."""
    removed = 0
    for path in _files():
        match = FILE_RE.match(path.name)
        if match and int(match.group(1)) < seq:
            path.unlink(missing_ok=True)
            removed += 1
    return removed
