"""The neutral model-provider interface: tools, tool calls, completions, errors and prices.

Messages are one neutral format, translated by each provider to its vendor's:
``{"role": "system"|"user"|"assistant"|"tool", "content": str}``; assistant messages may carry
``"tool_calls": [{"id", "name", "arguments"}]`` and tool messages carry ``"tool_call_id"`` and
``"name"``. Providers never retry: the engine records every call as a step and decides itself,
using :attr:`ProviderError.retryable`.
"""

import dataclasses
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import jsonschema


@dataclass(frozen=True)
class ToolSpec:
    """A tool offered to the model; ``parameters`` is the JSON Schema of its arguments."""

    name: str
    description: str
    parameters: dict


@dataclass(frozen=True)
class ToolCall:
    """A call the model asked for; ``reasoning`` is the model's text that accompanied it."""

    id: str
    name: str
    arguments: dict
    reasoning: str = ""


@dataclass(frozen=True)
class Completion:
    """One model answer: text and/or tool calls, with usage, cost and latency."""

    text: str
    tool_calls: list[ToolCall]
    model: str
    input_tokens: int
    output_tokens: int
    cost_usd: float
    latency_ms: int
    parsed: dict | None = None  # the parsed JSON when an output_schema was given

    def to_record(self) -> dict:
        """A JSON-serialisable dict of all fields, for the step record."""
        return dataclasses.asdict(self)


class ProviderError(Exception):
    """A failed model call; ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status


class Provider(Protocol):
    """What the engine calls. Implementations must not retry."""

    name: str

    def complete(
        self,
        *,
        model: str,
        messages: list[dict],
        tools: list[ToolSpec] | None = None,
        output_schema: dict | None = None,
        timeout: float = 60.0,
    ) -> Completion: ...


# USD per million input and output tokens.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "claude-sonnet-4": (3.00, 15.00),
    "claude-3-5-haiku": (0.80, 4.00),
    "scripted-1": (0.10, 0.40),
}


def _price(model: str) -> tuple[float, float] | None:
    """The exact entry, else the longest one the model is a dated version of
    (``gpt-4o-2024-08-06`` is ``gpt-4o``; ``gpt-4o-mini-2024-07-18`` is ``gpt-4o-mini``)."""
    if model in PRICES:
        return PRICES[model]
    prefixes = [key for key in PRICES if model.startswith(key + "-")]
    return PRICES[max(prefixes, key=len)] if prefixes else None


def cost_usd(model: str, input_tokens: int, output_tokens: int) -> float:
    """The cost of a call in USD; 0.0 for a model with no known price."""
    price = _price(model)
    if price is None:
        return 0.0
    return (input_tokens * price[0] + output_tokens * price[1]) / 1_000_000


def is_retryable_status(status: int) -> bool:
    """Timeouts, conflicts, rate limits and server errors may pass; other 4xx will not."""
    return status in (408, 409, 429) or status >= 500


def malformed(detail: str) -> ProviderError:
    """The error for model output that is not the JSON asked for (retryable: models vary)."""
    return ProviderError(f"model returned malformed JSON: {detail}", retryable=True)


_FENCE = re.compile(r"^```(?:json)?\s*\n(.*)\n```$", re.DOTALL)


def parse_output(text: str, schema: dict) -> dict:
    """Parse the model's text as a JSON object valid against ``schema`` (a code fence around
    it is tolerated), else raise a retryable :class:`ProviderError`."""
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1).strip()
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise malformed(f"{exc} in {text[:200]!r}") from exc
    if not isinstance(value, dict):
        raise malformed(f"expected a JSON object, got {type(value).__name__}")
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        raise malformed(f"does not match the output schema: {exc.message}") from exc
    except jsonschema.SchemaError as exc:
        raise ProviderError(f"invalid output schema: {exc.message}", retryable=False) from exc
    return value


def parse_arguments(raw: str | dict | None, tool: str) -> dict:
    """Tool-call arguments as a dict, from vendor JSON text (empty means none)."""
    if isinstance(raw, dict):
        return raw
    if raw is None or not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise malformed(f"arguments of {tool}: {exc} in {raw[:200]!r}") from exc
    if not isinstance(value, dict):
        raise malformed(f"arguments of {tool} are not a JSON object")
    return value


def message_text(message: dict) -> str:
    """A neutral message's content as text (``None`` is empty)."""
    content: Any = message.get("content")
    return content if isinstance(content, str) else "" if content is None else str(content)


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def wire_names(messages: list[dict], tools: list[ToolSpec] | None) -> dict[str, str]:
    """Map every tool name in play to a name vendors accept (``[A-Za-z0-9_-]{1,64}``), one to
    one, so ``orders.refund`` goes out as ``orders_refund`` and comes back as itself."""
    names: list[str] = [tool.name for tool in tools or []]
    for message in messages:
        names.extend(call["name"] for call in message.get("tool_calls") or [])
    mapping: dict[str, str] = {}
    used: set[str] = set()
    for name in _unique(names):
        wire = _UNSAFE.sub("_", name)[:64] or "tool"
        n = 1
        while wire in used:
            n += 1
            wire = f"{_UNSAFE.sub('_', name)[:58]}_{n}"
        mapping[name] = wire
        used.add(wire)
    return mapping


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def vendor_endpoint(
    vendor: str, *, api_key: str | None, base_url: str | None
) -> tuple[str, str | None]:
    """The API key and base URL of a vendor: given ones, else ``<VENDOR>_API_KEY`` and
    ``<VENDOR>_BASE_URL`` from the environment. A missing key is a non-retryable error."""
    prefix = vendor.upper()
    key = api_key or os.environ.get(f"{prefix}_API_KEY")
    if not key:
        raise ProviderError(
            f"{prefix}_API_KEY is not set: the {vendor} provider needs an API key",
            retryable=False,
        )
    return key, base_url or os.environ.get(f"{prefix}_BASE_URL") or None
