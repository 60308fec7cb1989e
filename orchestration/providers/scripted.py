"""A deterministic, rule-driven provider for the demo and tests: no network, same input, same
output. It acts on what its messages say, in this order:

1. ``SCRIPTED: fail <status>`` in the last user message raises that :class:`ProviderError`.
2. ``INSTRUCTION: call <tool> with <json object>`` in a user or tool message calls that tool,
   if offered and not yet called with those arguments, as a compromised model would.
3. Each offered tool not yet called in the conversation is called, one per turn, in order,
   its required arguments filled from the conversation text, the schema's defaults, or
   example values.
4. Then it answers: JSON built from the output schema the same way, or ``Done: ...`` text
   summing up the tool results it saw.
"""

import hashlib
import json
import math
import re
import time
from typing import Any

from .base import (
    Completion,
    ProviderError,
    ToolCall,
    ToolSpec,
    cost_usd,
    is_retryable_status,
    message_text,
    parse_output,
)

_FAIL = re.compile(r"SCRIPTED:\s*fail\s+(\d{3})\b", re.IGNORECASE)
_INSTRUCTION = re.compile(
    r"instruction:\s*call\s+([A-Za-z0-9_.\-]+)\s+with\s+(?=\{)", re.IGNORECASE
)
_EXAMPLES: dict[str, Any] = {
    "string": "unknown",
    "number": 0,
    "integer": 0,
    "boolean": False,
    "array": [],
    "null": None,
}
_DECODER = json.JSONDecoder()
_MISSING = object()  # no value found


class ScriptedProvider:
    """A :class:`~orchestration.providers.base.Provider` that follows the rules above."""

    name = "scripted"

    def complete(
        self,
        *,
        model: str,
        messages: list[dict],
        tools: list[ToolSpec] | None = None,
        output_schema: dict | None = None,
        timeout: float = 60.0,
    ) -> Completion:
        started = time.monotonic()
        _raise_if_told(messages)
        tools = tools or []
        # Values come from what the user and the tools said, not from instructions or its own turns.
        texts = [message_text(m) for m in messages if m.get("role") in ("user", "tool")]
        call = _injected_call(messages, tools) or _next_tool_call(messages, tools, texts)
        parsed = None
        if call is not None:
            call = ToolCall(
                id=_call_id(messages, call.name, call.arguments),
                name=call.name,
                arguments=call.arguments,
                reasoning=call.reasoning,
            )
            text, calls = call.reasoning, [call]
        elif output_schema is not None:
            text, calls = json.dumps(_fill(output_schema, texts, only_required=False)), []
            parsed = parse_output(text, output_schema)
        else:
            text, calls = _summary(messages), []
        input_tokens = _tokens(json.dumps(messages, sort_keys=True, default=str))
        output_tokens = _tokens(text + "".join(json.dumps(c.arguments) for c in calls))
        return Completion(
            text=text,
            tool_calls=calls,
            model=model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_usd=cost_usd("scripted-1", input_tokens, output_tokens),
            latency_ms=round((time.monotonic() - started) * 1000),
            parsed=parsed,
        )


def _raise_if_told(messages: list[dict]) -> None:
    users = [m for m in messages if m.get("role") == "user"]
    match = _FAIL.search(message_text(users[-1])) if users else None
    if match:
        status = int(match.group(1))
        raise ProviderError(
            f"scripted failure {status}", retryable=is_retryable_status(status), status=status
        )


def _calls_made(messages: list[dict]) -> list[dict]:
    return [c for m in messages if m.get("role") == "assistant" for c in m.get("tool_calls") or []]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _injected_call(messages: list[dict], tools: list[ToolSpec]) -> ToolCall | None:
    """The first instruction in a user or tool message naming an offered tool with arguments
    it was not yet called with."""
    offered = {tool.name for tool in tools}
    done = {(c["name"], _canonical(c.get("arguments") or {})) for c in _calls_made(messages)}
    for message in messages:
        if message.get("role") not in ("user", "tool"):
            continue
        text = message_text(message)
        for match in _INSTRUCTION.finditer(text):
            name = match.group(1)
            try:
                arguments, _ = _DECODER.raw_decode(text, match.end())
            except json.JSONDecodeError:
                continue
            if name in offered and (name, _canonical(arguments)) not in done:
                reasoning = (
                    f"The retrieved document says I should call {name} with "
                    f"{json.dumps(arguments)}, so I will do that."
                )
                return ToolCall(id="", name=name, arguments=arguments, reasoning=reasoning)
    return None


def _next_tool_call(
    messages: list[dict], tools: list[ToolSpec], texts: list[str]
) -> ToolCall | None:
    """The first offered tool not yet called, with its required arguments filled."""
    called = {c["name"] for c in _calls_made(messages)}
    goal = next((message_text(m) for m in messages if m.get("role") == "user"), "")
    for tool in tools:
        if tool.name not in called:
            arguments = _fill(tool.parameters, texts, only_required=True)
            reasoning = (
                f"To work toward the goal {_clip(goal)!r}, I will call {tool.name} "
                f"({tool.description.rstrip('.')}) with {json.dumps(arguments)}."
            )
            return ToolCall(id="", name=tool.name, arguments=arguments, reasoning=reasoning)
    return None


def _fill(schema: dict, texts: list[str], *, only_required: bool) -> dict:
    """An object for ``schema``: each property from the conversation text, else the
    schema's default, else an example of its type."""
    properties: dict = schema.get("properties") or {}
    names = schema.get("required", []) if only_required else list(properties)
    result = {}
    for name in names:
        prop = properties.get(name) or {}
        found = _find(name, prop, texts)
        if found is not _MISSING:
            result[name] = found
        elif "default" in prop:
            result[name] = prop["default"]
        elif prop.get("enum"):
            result[name] = prop["enum"][0]
        elif _type(prop) == "object":
            result[name] = _fill(prop, texts, only_required=only_required)
        elif _type(prop) == "string":
            result[name] = _explain(texts)
        else:
            result[name] = _EXAMPLES.get(_type(prop), "unknown")
    return result


def _explain(texts: list[str]) -> str:
    """A plausible sentence for a free-text field: what a labelled policy line says, else the
    request it was given."""
    for text in texts:
        for line in text.splitlines():
            if line.lower().startswith("policy:"):
                sentence = line.split(":", 1)[1].strip().split(". ")[0].rstrip(".")
                return f"The policy says: {_clip(sentence, 160)}."
    last = texts[-1] if texts else ""
    return f"Based on the request: {_clip(last, 160)}"


def _type(prop: dict) -> str | None:
    kind = prop.get("type")
    if isinstance(kind, list):
        return next((k for k in kind if k != "null"), None)
    return kind


def _find(name: str, prop: dict, texts: list[str]) -> Any:
    """The first value written for ``name`` in the texts (``name: v``, ``name=v``,
    ``"name": v``) that fits the property's type and enum."""
    pattern = re.compile(rf'(?<![\w.-])"?{re.escape(name)}"?\s*[:=]\s*', re.IGNORECASE)
    for text in texts:
        for match in pattern.finditer(text):
            value = _coerce(_value_at(text, match.end()), prop)
            if value is not _MISSING and (not prop.get("enum") or value in prop["enum"]):
                return value
    return _MISSING


def _value_at(text: str, position: int) -> Any:
    """A JSON value starting at ``position`` if one ends cleanly there, else the bare token."""
    try:
        value, end = _DECODER.raw_decode(text, position)
        if end == len(text) or not re.match(r"[\w-]", text[end]):
            return value
    except json.JSONDecodeError:
        pass
    token = re.match(r"[^\s,;)\]}]*", text[position:]).group(0)
    return token.rstrip(".").strip("'") or _MISSING


def _coerce(value: Any, prop: dict) -> Any:
    """``value`` as the property's type, or ``_MISSING`` when it is not one."""
    kind = _type(prop)
    if value is _MISSING or kind is None:
        return value
    if kind == "string":
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # order_id=1001 is the string "1001"
        return value if isinstance(value, str) else _MISSING
    if kind in ("number", "integer"):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return _MISSING
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            return _MISSING
        if kind == "integer" and value != int(value):
            return _MISSING
        return int(value) if value == int(value) else value
    if kind == "boolean":
        if isinstance(value, str):
            return {"true": True, "false": False}.get(value.lower(), _MISSING)
        return value if isinstance(value, bool) else _MISSING
    wanted = {"array": list, "object": dict}.get(kind)
    return value if wanted and isinstance(value, wanted) else _MISSING


def _summary(messages: list[dict]) -> str:
    results = [
        f"{m.get('name') or 'tool'} returned {' '.join(message_text(m).split())}"
        for m in messages
        if m.get("role") == "tool"
    ]
    if not results:
        goal = next((message_text(m) for m in reversed(messages) if m.get("role") == "user"), "")
        names = re.findall(r'"name"\s*:\s*"([^"]+)"', goal)
        if names:
            return f"{len(names)} option(s) fit the request: {', '.join(names)}."
        return f"Done: no tools were needed for {_clip(goal)!r}."
    return "Done: " + "; ".join(results) + "."


def _call_id(messages: list[dict], name: str, arguments: dict) -> str:
    digest = hashlib.sha256(_canonical([messages, name, arguments]).encode()).hexdigest()
    return f"call_{digest[:24]}"


def _clip(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))
