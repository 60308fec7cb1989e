"""What a run's labelled data is and where it goes: the labels the run has touched, the labels
an action's arguments carry by value, and whose personal data the run has read.

Taint by value compares both sides normalised (look-alike Cyrillic and Greek letters read as
the Latin ones, NFKC, case folded, letters and digits only), so case, spacing, punctuation and
homoglyphs do not hide a value. The arguments are also read decoded (percent-encoding, HTML
entities, base64, URL-safe base64 and hex, up to two layers, base64 at any alignment and read
backwards too), and a value is
found reversed or in pieces of at least ``MIN_PIECE`` characters spread over one or several
arguments. Minimum lengths keep ordinary text from matching: a labelled value is looked for from
``MIN_LENGTH`` normalised characters, and in pieces only from ``MIN_PIECES_LENGTH``.

This is a net for data that leaks by accident or by a careless injection; an encoding it does
not know (ROT13, any cipher) hides a value from it, so a policy protects what must never leave
by what the run touched (``run.labels``), not by what an action seems to carry."""

import base64
import binascii
import html
import re
import string
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from django.db.models import Q

from orchestration.engine.steps import run_subtree
from orchestration.registry.declare import TOOLS
from orchestration.runs.models import Step, StepKind, StepStatus

MIN_LENGTH = 6  # normalised characters of a labelled value to look for
MIN_PIECE = 4  # the shortest piece of a value split up
MIN_PIECES_LENGTH = 10  # a value is looked for in pieces from this length ...
MAX_PIECES_LENGTH = 256  # ... to this one; a longer value by its windows:
WINDOW, WINDOW_STEP = 32, 16  # any excerpt of WINDOW + WINDOW_STEP - 1 characters is found
MIN_ENCODED = 8  # the shortest token read as base64 or hex
DECODE_DEPTH = 2
PII = "pii"

_NOT_ALNUM = re.compile(r"[\W_]+")
_BASE64 = re.compile(rf"[A-Za-z0-9+/_-]{{{MIN_ENCODED},}}")
_HEX = re.compile(rf"(?:[0-9A-Fa-f]{{2}}){{{MIN_ENCODED // 2},}}")
_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+")
_URLSAFE = str.maketrans("-_", "+/")
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
# Cyrillic and Greek letters that look like Latin ones (NFKC keeps them apart)
_LOOKALIKES = str.maketrans(
    "аеорсхуіјѕкмнтвАЕОРСХУІЈЅКМНТВαοριεκντυχΑΒΕΗΙΚΜΝΟΡΤΥΧΖ",
    "aeopcxyijskmhtbAEOPCXYIJSKMHTBaopiekvtuxABEHIKMNOPTYXZ",
)


@dataclass(frozen=True)
class Taint:
    touched: frozenset[str]  # the labels of every labelled step of the run
    carried: frozenset[str]  # the labels the arguments carry by value
    data_subject: str  # whose personal data the run read: one address, lower case, or ""
    data_subjects: tuple[str, ...] = ()  # everyone's it read ("" for someone not known)


def normal(text: str) -> str:
    text = unicodedata.normalize("NFKC", text.translate(_LOOKALIKES))
    return _NOT_ALNUM.sub("", text.casefold())


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def _decodings(text: str) -> Iterator[str]:
    """``text`` with its percent-encoding and HTML entities decoded, and what its base64 or hex
    tokens decode to (leniently: noise is dropped later). Words (letters in one case, maybe
    capitalised) are not read as base64."""
    yield from {unquote(text), html.unescape(text)} - {text}
    sources = (text, _SPACE.sub("", text))
    for token in {token for source in sources for token in _HEX.findall(source)}:
        yield bytes.fromhex(token).decode("utf-8", "ignore")
    tokens = {token for source in sources for token in _BASE64.findall(source)}
    for token in tokens:
        if _WORD.fullmatch(token):
            continue
        for candidate in (token, token[::-1]):
            candidate = candidate.translate(_URLSAFE)
            for start in range(4):
                chunk = candidate[start:]
                chunk = chunk[: len(chunk) - len(chunk) % 4]
                try:
                    yield base64.b64decode(chunk).decode("utf-8", "ignore")
                except (binascii.Error, ValueError):
                    continue


def _forms(text: str, depth: int = DECODE_DEPTH) -> Iterator[str]:
    yield normal(text)
    if depth:
        for decoded in _decodings(text):
            if len(normal(decoded)) >= MIN_PIECE:
                yield from _forms(decoded, depth - 1)


def haystack(args: dict[str, Any]) -> str:
    """Every argument string in every form, normalised, separated."""
    return "|".join(form for text in strings(args) for form in _forms(text) if form)


def _in_pieces(value: str, hay: str) -> bool:
    """Whether ``value`` is a run of pieces of ``hay``, each at least MIN_PIECE long (the last
    may be shorter), taken greedily."""
    i = 0
    while i < len(value):
        n = MIN_PIECE
        if value[i : i + n] not in hay:
            return False
        while i + n < len(value) and value[i : i + n + 1] in hay:
            n += 1
        i += n
    return True


def found(value: str, hay: str) -> bool:
    """Whether a labelled value (normalised) is in the haystack, whole, reversed or in pieces."""
    if len(value) < MIN_LENGTH:
        return False
    if value in hay or value[::-1] in hay:
        return True
    if len(value) > MAX_PIECES_LENGTH:
        windows = range(0, len(value) - WINDOW + 1, WINDOW_STEP)
        return any(value[i : i + WINDOW] in hay for i in windows)
    return len(value) >= MIN_PIECES_LENGTH and _in_pieces(value, hay)


def _subject(name: str, output: Any) -> str | None:
    """Whose personal data a step's output is, by its tool's ``data_subject`` field."""
    definition = TOOLS.get(name)
    field = definition.data_subject if definition else ""
    value = output.get(field) if field and isinstance(output, dict) else None
    return value.strip().translate(_ASCII_LOWER) if isinstance(value, str) else None


def run_taint(
    run_id: int,
    args: dict[str, Any],
    *,
    step_seq: int | None = None,
    tools: dict[str, dict[str, Any]] | None = None,
) -> Taint:
    """The run's labelled data, from one query over the steps of the run and its descendants
    (plus one per level to find them): what a handoff's child run read comes back with its
    result, so it is the parent's too, and whose data it was is known from the child's steps.
    A tool step that is executing (its output not yet recorded) counts as having read the
    labels its tool produces (as ``tools``, the deciding policy's, knows it), about no one
    known; the step being decided (``step_seq``, marked started before its review) has read
    nothing yet."""
    executing = Q(kind=StepKind.TOOL, status__in=(StepStatus.STARTED, StepStatus.RETRYING))
    rows = (
        Step.objects.filter(run_id__in=run_subtree(run_id))
        .filter((Q(status=StepStatus.COMPLETED) & ~Q(labels=[])) | executing)
        .exclude(run_id=run_id, seq=step_seq)
        .values_list("kind", "name", "status", "output", "labels")
    )
    hay = haystack(args)
    touched: set[str] = set()
    carried: set[str] = set()
    subjects: set[str | None] = set()
    for kind, name, status, output, labels in rows:
        if status != StepStatus.COMPLETED:
            labels, output = _produces(name, tools or {}), None
        if not labels:
            continue
        touched.update(labels)
        if PII in labels and kind != StepKind.HANDOFF:  # a handoff's: its child run's steps
            subjects.add(_subject(name, output))
        fresh = hay and not set(labels) <= carried
        if fresh and any(found(normal(text), hay) for text in strings(output)):
            carried.update(labels)
    everyone = tuple(sorted(subject or "" for subject in subjects))
    only = next(iter(subjects)) if len(subjects) == 1 else None
    return Taint(frozenset(touched), frozenset(carried), only or "", everyone)


def _produces(tool: str, tools: dict[str, dict[str, Any]]) -> list[str]:
    """The labels ``tool``'s result carries: as the policy knows it, else as its code declares."""
    if tool in tools:
        return list(tools[tool].get("labels_produced", []))
    definition = TOOLS.get(tool)
    return list(definition.labels_produced) if definition else []
