"""Signed checkpoints: the chain's sequence and hash at a moment, kept outside the database.

A checkpoint is one small JSON file in ``BATON_AUDIT_CHECKPOINT_DIR``, named after its sequence,
holding ``seq``, ``hash``, ``at`` (when it was written), ``kind`` and ``signature``: HMAC-SHA256
over the canonical JSON of the other four, with ``BATON_AUDIT_KEY`` (or, when that is unset, a key
derived from ``SECRET_KEY`` under a fixed label; checkpoints signed with a key derived from one of
``SECRET_KEY_FALLBACKS`` are read too, so rotating ``SECRET_KEY`` keeps them valid). ``kind`` is
``"periodic"`` (beat's) or ``"prune"`` (written by pruning before it deletes the records up to it:
only such a checkpoint may anchor a pruned chain). Files written before ``kind`` existed hold
the other three fields only, signed over them, and count as periodic.

Someone who can rewrite the database but not this folder and the key cannot rewrite the chain up
to a checkpoint (every hash recomputed), cut its tail or delete its oldest records without
verification noticing; and a checkpoint cannot be altered or forged without the key.
"""

import contextlib
import hashlib
import hmac
import json
import os
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from orchestration.canonical import canonical_json

KEY_LABEL = b"baton.ledger.checkpoint-key.v1"
FILE_RE = re.compile(r"^checkpoint-(\d{20})\.json$")
HASH_RE = re.compile(r"^[0-9a-f]{64}$")
PERIODIC, PRUNE = "periodic", "prune"
KINDS = (PERIODIC, PRUNE)


class CheckpointError(Exception):
    """A checkpoint file that cannot be trusted, or one that cannot be written."""


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    hash: str
    at: str  # ISO 8601, UTC, microseconds
    path: Path
    kind: str = PERIODIC  # PRUNE: written by pruning, the anchor of the records kept


def checkpoint_dir() -> Path:
    return Path(settings.BATON_AUDIT_CHECKPOINT_DIR)


def checkpoint_path(seq: int) -> Path:
    return checkpoint_dir() / f"checkpoint-{seq:020d}.json"


def _keys() -> list[bytes]:
    """The signing key first, then the older keys whose signatures are still accepted: with no
    ``BATON_AUDIT_KEY``, the keys derived from each of ``SECRET_KEY_FALLBACKS``."""
    key = getattr(settings, "BATON_AUDIT_KEY", "")
    if key:
        return [key.encode()]
    secrets = [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", ())]
    return [hmac.new(secret.encode(), KEY_LABEL, hashlib.sha256).digest() for secret in secrets]


def _signed_text(seq: int, hash_: str, at: str, kind: str | None) -> bytes:
    fields = {"seq": seq, "hash": hash_, "at": at}
    if kind is not None:  # None: a file from before kinds existed
        fields["kind"] = kind
    return canonical_json(fields).encode()


def _signature(seq: int, hash_: str, at: str, kind: str | None, key: bytes | None = None) -> str:
    text = _signed_text(seq, hash_, at, kind)
    return hmac.new(key or _keys()[0], text, hashlib.sha256).hexdigest()


def write_checkpoint(
    seq: int, hash_: str, *, at: datetime | None = None, kind: str = PERIODIC
) -> Checkpoint:
    """Write (durably) the checkpoint of ``seq``, signed with the current key.

    A valid checkpoint of ``seq`` with the same hash already there (written before, or by a
    concurrent writer) counts as written; a periodic one is replaced by a prune checkpoint, never
    the other way. A different hash for a sequence already checkpointed is refused, never
    overwritten. Each write goes through its own temporary file, so writers never collide."""
    if seq < 1 or not HASH_RE.match(hash_) or kind not in KINDS:
        raise CheckpointError(f"refused to write a {kind} checkpoint of #{seq} with hash {hash_!r}")
    path = checkpoint_path(seq)
    if path.exists():
        existing = _same_checkpoint(path, hash_, kind)
        if existing is not None:
            return existing
    stamp = (at or timezone.now()).astimezone(UTC).isoformat(timespec="microseconds")
    body = {
        "seq": seq,
        "hash": hash_,
        "at": stamp,
        "kind": kind,
        "signature": _signature(seq, hash_, stamp, kind),
    }
    partial = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "x", encoding="utf-8") as handle:
            handle.write(json.dumps(body, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(partial, path)  # never replaces a checkpoint another writer put there
        except FileExistsError:
            existing = _same_checkpoint(path, hash_, kind)
            if existing is not None:
                return existing
            os.replace(partial, path)  # a prune checkpoint replaces the periodic one
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
    return read_checkpoint(path)


def _same_checkpoint(path: Path, hash_: str, kind: str) -> Checkpoint | None:
    """The checkpoint in ``path`` if it already is the one to write (a prune checkpoint also
    stands for a periodic one); None if it is a periodic one to be replaced by a prune one;
    raises ``CheckpointError`` if it is invalid or holds another hash."""
    existing = read_checkpoint(path)
    if existing.hash != hash_:
        raise CheckpointError(
            f"{path.name} already says #{existing.seq} has hash {existing.hash[:16]}, "
            f"not {hash_[:16]}: the chain changed since that checkpoint"
        )
    if kind == PRUNE and existing.kind != PRUNE:
        return None
    return existing


def read_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint in ``path``; raises ``CheckpointError`` unless it is well formed, named
    after its own sequence and signed with this installation's key (or a fallback key)."""
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path.name} cannot be read: {exc}") from exc
    fields = {"seq", "hash", "at", "signature"}
    if not isinstance(body, dict) or set(body) not in (fields, fields | {"kind"}):
        raise CheckpointError(f"checkpoint {path.name} is malformed")
    seq, hash_, at, signature = body["seq"], body["hash"], body["at"], body["signature"]
    kind = body.get("kind")  # None: written before kinds existed, signed without one
    if not (type(seq) is int and isinstance(hash_, str) and isinstance(at, str)):
        raise CheckpointError(f"checkpoint {path.name} is malformed")
    if kind is not None and kind not in KINDS:
        raise CheckpointError(f"checkpoint {path.name} is malformed")
    if not isinstance(signature, str) or not any(
        hmac.compare_digest(signature, _signature(seq, hash_, at, kind, key)) for key in _keys()
    ):
        raise CheckpointError(
            f"checkpoint {path.name} has an invalid signature: it was altered or forged"
        )
    if path.name != f"checkpoint-{seq:020d}.json":
        raise CheckpointError(f"checkpoint {path.name} holds #{seq}: it was renamed")
    return Checkpoint(seq=seq, hash=hash_, at=at, path=path, kind=kind or PERIODIC)


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
