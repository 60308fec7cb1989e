"""CEL conditions: compile, check names against the context and the tools' argument schemas
(the CEL package has no type checker, and a typo must never silently weaken a policy), dry-run
on sample data, evaluate."""

from __future__ import annotations

import ast
import datetime as dt
import difflib
import functools
import re
import string
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import cel

# The context the gate builds; leaves are type names, "args" means the tools' argument schemas,
# "sums" a map from each numeric top-level argument of the tools to a double.
# fmt: off
_TOTALS = {"count": "int", "sum": "sums"}
CONTEXT_FIELDS: dict[str, Any] = {
    "action": {"tool": "string", "args": "args", "hash": "string", "labels": "list",
               "reasoning": "string", "confidence": "double"},
    "args": "args",  # alias of action.args
    "tool": {"name": "string", "side_effect": "string", "impact": "int", "reversible": "bool",
             "labels_read": "list", "labels_produced": "list"},
    "agent": {"name": "string", "autonomy": "string", "status": "string",
              "record": {"actions": "int", "reject_rate": "double", "error_rate": "double"}},
    "run": {"id": "int", "workflow": "string", "intent": {"goal": "string", "constraints": "list"},
            "boundaries": "list", "labels": "list", "cost_usd": "double", "steps": "int",
            "answers": "list",
            "data_subject": "string", "data_subjects": "list"},
    "totals": {"run": _TOTALS, "agent": _TOTALS, "target": _TOTALS},
    "risk": {"score": "int", "factors": "list"},
    "now": "timestamp",
}
# The functions of CEL's strings extension that the CEL package (0.10) lacks, as CEL defines
# them (ASCII only), registered on every evaluation context.
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_ASCII_UPPER = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)
EXTENSIONS = {
    "lowerAscii": lambda text: text.translate(_ASCII_LOWER),
    "upperAscii": lambda text: text.translate(_ASCII_UPPER),
    "trim": lambda text: text.strip(),
}
# The functions the CEL package (0.10) implements, and the extensions: any other name fails at
# run time.
CEL_FUNCTIONS = frozenset({
    "size", "contains", "startsWith", "endsWith", "matches", "int", "uint", "double", "string",
    "bytes", "dyn", "type", "duration", "timestamp", "getFullYear", "getMonth", "getDate",
    "getDayOfMonth", "getDayOfWeek", "getDayOfYear", "getHours", "getMinutes", "getSeconds",
    "getMilliseconds", *EXTENSIONS,
})
_TYPES = frozenset({"bool", "bytes", "double", "int", "list", "map", "null_type", "string", "type",
                    "uint"})
_SAMPLES: dict[Any, Any] = {
    "string": "sample", "int": 1, "uint": 1, "double": 1.5, "bool": True, "bytes": b"sample",
    "number": 1.5, "integer": 1, "boolean": True, "null": None,
    "email": "a@example.com", "date-time": "2025-01-01T00:00:00Z", "date": "2025-01-01",
}
_TOKEN = re.compile(r"""(?xs)
    (?P<skip> \s+ | //[^\n]* )
  | (?P<str> (?:[rR][bB]?|[bB][rR]) (?:'''.*?(?:'''|\Z) | \"\"\".*?(?:\"\"\"|\Z)
                                    | '[^'\n]*'? | "[^"\n]*"?)
    | [bB]? (?:'''(?:\\.|.)*?(?:'''|\Z) | \"\"\"(?:\\.|.)*?(?:\"\"\"|\Z)
              | '(?:\\.|[^'\\\n])*'? | "(?:\\.|[^"\\\n])*"?) )
  | (?P<ident> [A-Za-z_][A-Za-z0-9_]* )
  | (?P<num> 0[xX][0-9a-fA-F]+[uU]? | [0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?[uU]? )
  | (?P<punct> . )""")
# fmt: on
_RESERVED = frozenset({"true", "false", "null", "in"})  # other reserved words do not parse
_MACROS = frozenset({"all", "exists", "exists_one", "existsOne", "map", "filter"})
_ITEM = "\0item"  # path part: an item of the list before it
_LOCATION = re.compile(r"<input>:(\d+):(\d+): ([^\n]*)")
Token = tuple[str, str, int, int]  # kind (str, ident, num, punct), text, start, end


class ConditionError(ValueError):
    """A condition that does not compile or does not fit its context; ``position`` is 0-based."""

    def __init__(self, message: str, position: int = 0, source: str = "") -> None:
        super().__init__(message)
        self.message, self.position = message, position
        before = source[:position]
        self.line, self.column = before.count("\n") + 1, position - before.rfind("\n")

    def __str__(self) -> str:
        return f"{self.message} (at {self.line}:{self.column})"


class EvaluationError(ValueError):
    """A condition that failed at run time: missing key, type error or non-bool result."""


@dataclass(frozen=True)
class FieldPath:
    """A chain of field selections such as ``agent.record.reject_rate`` and its source span."""

    parts: tuple[str, ...]
    start: int
    end: int


@dataclass(frozen=True)
class _Ref:
    names: tuple[str, ...]  # the parts as written, with where each starts:
    offsets: tuple[int, ...]
    end: int
    path: tuple[str, ...] | None  # resolved: a macro variable becomes its list + _ITEM
    bound: bool  # rooted at a macro variable


@functools.lru_cache(maxsize=4096)
def compile_condition(source: str) -> cel.Program:
    """Compile a condition (cached); a syntax error becomes a positioned ``ConditionError``."""
    if not source.strip():
        raise ConditionError("a condition is required", position=0)
    try:
        return cel.compile(source)
    except ValueError as exc:
        if (found := _LOCATION.search(str(exc))) is None:
            raise ConditionError(str(exc), 0, source) from exc
        lines = source.split("\n")
        offset = sum(len(line) + 1 for line in lines[: int(found[1]) - 1]) + int(found[2]) - 1
        raise ConditionError(found[3], min(max(offset, 0), len(source)), source) from exc


def _string_value(text: str) -> str | None:
    """The value of a string literal token; None for bytes or a malformed literal."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = ast.literal_eval(text)
    except (SyntaxError, ValueError):
        return None
    return value if isinstance(value, str) else None


def _scan(source: str) -> tuple[list[_Ref], set[str], list[Token]]:
    """Field references in source order, the names macros bind, and the tokens."""
    toks = [(m.lastgroup or "", m[0], m.start(), m.end()) for m in _TOKEN.finditer(source)]
    toks = [t for t in toks if t[0] != "skip"]
    pad = [*toks, *[("end", "", len(source), len(source))] * 4]  # pad[-1], pad[len + 3] exist

    def ident(k: int) -> bool:
        return pad[k][0] == "ident" and pad[k][1] not in _RESERVED

    close, stack = {}, []
    for k, tok in enumerate(toks):  # only punctuation can have the text "(" or ")"
        if tok[1] == "(":
            stack.append(k)
        elif tok[1] == ")" and stack:
            close[stack.pop()] = k
    scopes: list[tuple[str, int, int, tuple[str, ...] | None]] = []  # name, from, to, items
    chains: dict[int, tuple[str, ...] | None] = {}  # last token of a chain -> its path
    refs, i = [], 0
    while i < len(toks):
        text, dot = toks[i][1], pad[i - 1][1] == "."
        if dot and text in _MACROS and ident(i + 2) and pad[i + 1][1] + pad[i + 3][1] == "(,":
            items = chains.get(i - 2)  # the receiver: a macro variable is one of its items
            scopes.append(
                (pad[i + 2][1], i, close.get(i + 1, len(toks)), items and (*items, _ITEM))
            )
        if not ident(i) or dot or pad[i + 1][1] == "(":
            i += 1
            continue
        names, offsets, j = [text], [toks[i][2]], i
        while True:
            key, step = None, 2
            if pad[j + 1][1] == "." and ident(j + 2) and pad[j + 3][1] != "(":
                key = pad[j + 2][1]
            elif pad[j + 1][1] == "[" and pad[j + 2][0] == "str" and pad[j + 3][1] == "]":
                key, step = _string_value(pad[j + 2][1]), 3
            if key is None:
                break
            names.append(key)
            offsets.append(pad[j + 2][2])
            j += step
        scope = next((s for s in reversed(scopes) if s[0] == text and s[1] < i < s[2]), None)
        base = scope[3] if scope else (text,)
        chains[j] = base and (*base, *names[1:])
        if scope or len(names) > 1 or text not in _TYPES:
            refs.append(_Ref(tuple(names), tuple(offsets), toks[j][3], chains[j], bool(scope)))
        i = j + 1
    return refs, {s[0] for s in scopes}, toks


def field_paths(source: str) -> list[FieldPath]:
    """The field-selection chains of a condition (calls and macro variables left out)."""
    return [FieldPath(r.names, r.offsets[0], r.end) for r in _scan(source)[0] if not r.bound]


def _hint(name: str, candidates: Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _props(node: Any) -> dict[str, Any]:
    props = node.get("properties") if isinstance(node, dict) else None
    return props if isinstance(props, dict) else {}


def numeric_arguments(schema: Any) -> list[str]:
    """The top-level arguments of a schema that are numbers: the ones totals sum."""
    numeric = ("number", "integer")
    return sorted(
        name
        for name, sub in _props(schema).items()
        if isinstance(sub, dict)
        and (sub.get("type") in numeric or any(k in numeric for k in sub.get("type") or ()))
    )


def _args_problem(parts: tuple[str, ...], schemas: list[dict]) -> tuple[int, list[str]] | None:
    """The first part that no schema defines, with the names defined there."""
    nodes: list[Any] = schemas
    for k, part in enumerate(parts):
        if part == _ITEM:
            if not (found := [n["items"] for n in nodes if isinstance(n.get("items"), dict)]):
                return None  # not a list of known items: the dry run has the last word
        elif not (
            found := [_props(n)[part] for n in nodes if isinstance(_props(n).get(part), dict)]
        ):
            return k, [name for n in nodes for name in _props(n)]
        nodes = found
    return None


def _problem(ref: _Ref, context: dict[str, Any], schemas: list[dict]) -> tuple[int, str] | None:
    """The first invalid part of a reference: (index into ``ref.names``, message)."""
    path, node = ref.path or (), context
    shift = len(path) - len(ref.names)

    def shown(r: int) -> str:
        return ".".join(ref.names[: max(r - shift, 0) + 1])

    for r, part in enumerate(path):
        if node == "sums":
            sums = {name for schema in schemas for name in numeric_arguments(schema)}
            if part not in sums:
                hint = _hint(part, sums, shown(r - 1) + ".")
                return r - shift, f"{shown(r)} is not a numeric argument of the tools{hint}"
            node = "double"
            continue
        if node == "args" and (bad := _args_problem(path[r:], schemas)):
            r, hint = r + bad[0], _hint(path[r + bad[0]], bad[1], shown(r + bad[0] - 1) + ".")
            return max(r - shift, 0), f"{shown(r)} is not an argument of the tools in scope{hint}"
        if node == "args" or part == _ITEM or node in ("map", "dyn"):
            return None
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, dict) and r == 0:
            return 0, f"unknown variable {part!r}{_hint(part, node)}"
        elif isinstance(node, dict):
            hint = _hint(part, node, shown(r - 1) + ".")
            return r - shift, f"{shown(r)} is not a field of {shown(r - 1)}{hint}"
        else:
            return r - shift, f"{shown(r - 1)} is a {node} and has no field {part!r}"
    return None


def _sample(schema: Any) -> Any:
    """A plausible value for a JSON Schema: its first enum value, else one of its type."""
    if not isinstance(schema, dict):
        return "sample"
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    kind = next((k for k in kind if k != "null"), "null") if isinstance(kind, list) else kind
    if kind == "object" or (kind is None and "properties" in schema):
        return {name: _sample(sub) for name, sub in _props(schema).items()}
    if kind == "array" or (kind is None and "items" in schema):
        return [_sample(schema.get("items"))]
    return _SAMPLES.get(schema.get("format") if kind in ("string", None) else kind, "sample")


def _fill(node: Any, args: dict[str, Any], now: dt.datetime) -> Any:
    if isinstance(node, dict):
        return {key: _fill(sub, args, now) for key, sub in node.items()}
    if node == "sums":
        return {k: float(v) for k, v in args.items() if type(v) in (int, float)}
    if node in ("args", "timestamp", "list", "map", "dyn"):
        return {"args": args, "timestamp": now, "list": []}.get(node, {})  # items: unknown type
    return _SAMPLES.get(node, "sample")


def sample_contexts(context: dict[str, Any], args_schemas: list[dict]) -> list[dict[str, Any]]:
    """Contexts for a dry run: every field filled, one per argument schema (or empty args)."""
    now, argsets = dt.datetime.now(dt.UTC), [_sample(s) for s in args_schemas] or [{}]
    return [_fill(context, args if isinstance(args, dict) else {}, now) for args in argsets]


def validate_condition(source: str, *, context: dict[str, Any], args_schemas: list[dict]) -> None:
    """Refuse a condition that does not compile, names an unknown field or fails a dry run."""
    program = compile_condition(source)
    refs, bound, toks = _scan(source)
    for ref in refs:
        if problem := _problem(ref, context, args_schemas):
            raise ConditionError(problem[1], ref.offsets[max(problem[0], 0)], source)
    functions = [f for f in program.functions() if f[:1].isalpha()]  # not operators: _+_, @in
    for kind, names, known in (
        ("variable", program.variables(), {*context, *bound, *_TYPES}),
        ("function", functions, CEL_FUNCTIONS),
    ):
        for name in (n for n in names if n not in known):
            at = next((t[2] for t in toks if t[0] == "ident" and t[1] == name.lstrip(".")), 0)
            raise ConditionError(f"unknown {kind} {name!r}{_hint(name, known)}", at, source)
    for sample in sample_contexts(context, args_schemas):
        try:
            evaluate(program, sample)
        except EvaluationError as exc:
            if isinstance(exc.__cause__, IndexError):
                continue  # the sample lists have a single item
            guard = " (a field some tools in scope lack needs a has() guard)"
            guard = guard if isinstance(exc.__cause__, KeyError) else ""
            raise ConditionError(f"dry run failed: {exc}{guard}", 0, source) from exc


def cel_context(values: dict[str, Any]) -> cel.Context:
    """An evaluation context with the extension functions: build one per decision."""
    context = cel.Context(values)
    for name, function in EXTENSIONS.items():
        context.add_function(name, function)
    return context


def evaluate(program: cel.Program, context: cel.Context | dict[str, Any]) -> bool:
    """Run a compiled condition; a failure or a non-bool result raises ``EvaluationError``."""
    if isinstance(context, dict):
        context = cel_context(context)
    try:
        result = program.execute(context)
    except KeyError as exc:
        raise EvaluationError(f"no such key {exc}") from exc
    except Exception as exc:
        raise EvaluationError(str(exc) or type(exc).__name__) from exc
    if not isinstance(result, bool):
        raise EvaluationError(f"condition must be true or false, got {result!r}")
    return result
