"""Canonical JSON: one text for one value, so that hashes over it are stable.

Keys sorted, no insignificant whitespace, strings in Unicode NFC, integral floats written as
integers (``1.0`` and ``1`` are the same number), no NaN or infinity, and no NUL character
anywhere (PostgreSQL text cannot hold it, and agent text carrying one is refused, not mangled).
"""

import hashlib
import json
import math
import unicodedata
from decimal import Decimal
from typing import Any


class CanonicalError(ValueError):
    """A value that has no canonical JSON form; the message names where it is."""


def _normalise(value: Any, path: str) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float | Decimal):
        finite = value.is_finite() if isinstance(value, Decimal) else math.isfinite(value)
        if not finite:
            raise CanonicalError(f"{path} is not a finite number")
        if value == int(value):
            return int(value)
        return float(value)
    if isinstance(value, str):
        if "\x00" in value:
            raise CanonicalError(f"{path} contains a NUL character, which is refused")
        return unicodedata.normalize("NFC", value)
    if isinstance(value, dict):
        result = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise CanonicalError(f"{path} has a non-string key {key!r}")
            norm_key = _normalise(key, f"{path} key")
            if norm_key in result:
                raise CanonicalError(f"{path} has two keys that normalise to {norm_key!r}")
            result[norm_key] = _normalise(item, f"{path}.{key}")
        return result
    if isinstance(value, list | tuple):
        return [_normalise(item, f"{path}[{index}]") for index, item in enumerate(value)]
    raise CanonicalError(f"{path} is a {type(value).__name__}, which JSON cannot hold")


def canonical_json(value: Any, *, path: str = "value") -> str:
    """The canonical JSON text of ``value``; raises ``CanonicalError`` naming the bad part."""
    return json.dumps(
        _normalise(value, path),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _trimmed(value: Any) -> Any:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, dict):
        return {key: _trimmed(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_trimmed(item) for item in value]
    return value


def canonical_args(args: dict[str, Any]) -> dict[str, Any]:
    """An action's arguments in canonical form: strings trimmed and in NFC, integral numbers as
    integers, keys sorted. Rules read these typed values; the action hash is taken over them."""
    return json.loads(canonical_json(_trimmed(args), path="args"))


def action_hash(tool: str, args: dict[str, Any]) -> str:
    """SHA-256 of the canonical text of a tool and its arguments: equivalent arguments (key
    order, ``1`` and ``1.0``, NFC, surrounding spaces) have one hash, different ones differ."""
    return sha256_hex(canonical_json({"tool": tool, "args": canonical_args(args)}))


def args_diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[Any]]:
    """The top-level arguments that differ: ``{name: [before, after]}``, sorted by name."""
    keys = sorted(set(before) | set(after))
    return {k: [before.get(k), after.get(k)] for k in keys if before.get(k) != after.get(k)}
