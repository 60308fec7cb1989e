"""The Anthropic Messages API with tool use, through the official SDK.

Configured from the environment at call time: ``ANTHROPIC_BASE_URL`` (default the SDK's) and
``ANTHROPIC_API_KEY`` (required). System messages go to ``system``, tool results become
``tool_result`` blocks, and the text blocks before a ``tool_use`` block are that call's
reasoning. An output schema is asked for in the system prompt and the text is parsed.
"""

import json
import time

import anthropic

from .base import (
    Completion,
    ProviderError,
    ToolCall,
    ToolSpec,
    cost_usd,
    is_retryable_status,
    malformed,
    message_text,
    parse_output,
    vendor_endpoint,
    wire_names,
)

JSON_INSTRUCTION = (
    "Respond with only a JSON object, no other text, that validates against this JSON Schema:\n"
)


class AnthropicProvider:
    """A :class:`~orchestration.providers.base.Provider` for the Anthropic Messages API."""

    name = "anthropic"

    def __init__(
        self, *, base_url: str | None = None, api_key: str | None = None, max_tokens: int = 4096
    ) -> None:
        self.base_url = base_url
        self.api_key = api_key
        self.max_tokens = max_tokens

    def complete(
        self,
        *,
        model: str,
        messages: list[dict],
        tools: list[ToolSpec] | None = None,
        output_schema: dict | None = None,
        timeout: float = 60.0,
    ) -> Completion:
        api_key, base_url = vendor_endpoint(
            "anthropic", api_key=self.api_key, base_url=self.base_url
        )
        names = wire_names(messages, tools)
        system, turns = to_anthropic_messages(messages, names)
        if output_schema is not None:
            instruction = JSON_INSTRUCTION + json.dumps(output_schema)
            system = f"{system}\n\n{instruction}" if system else instruction
        request: dict = {"model": model, "max_tokens": self.max_tokens, "messages": turns}
        if system:
            request["system"] = system
        if tools:
            request["tools"] = [
                {"name": names[t.name], "description": t.description, "input_schema": t.parameters}
                for t in tools
            ]
        started = time.monotonic()
        try:
            with anthropic.Anthropic(
                base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout
            ) as client:
                response = client.messages.create(**request)
        except anthropic.AnthropicError as exc:
            raise _classify(exc) from exc
        latency_ms = round((time.monotonic() - started) * 1000)
        return _completion(response, model, names, output_schema, latency_ms)


def to_anthropic_messages(messages: list[dict], names: dict[str, str]) -> tuple[str, list[dict]]:
    """The system text and the turns, as content blocks; consecutive turns of one role are
    merged (the API wants all results of parallel tool calls in one user turn)."""
    system: list[str] = []
    turns: list[dict] = []
    for message in messages:
        role, content = message.get("role"), message_text(message)
        if role == "system":
            system.append(content)
            continue
        if role == "user":
            blocks = [{"type": "text", "text": content}]
        elif role == "assistant":
            blocks = [{"type": "text", "text": content}] if content else []
            blocks += [
                {
                    "type": "tool_use",
                    "id": call["id"],
                    "name": names.get(call["name"], call["name"]),
                    "input": call.get("arguments") or {},
                }
                for call in message.get("tool_calls") or []
            ]
        elif role == "tool":
            role = "user"
            blocks = [
                {"type": "tool_result", "tool_use_id": message["tool_call_id"], "content": content}
            ]
        else:
            raise ProviderError(f"unknown message role {role!r}", retryable=False)
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return "\n\n".join(system), turns


def _completion(
    response, model: str, names: dict[str, str], output_schema: dict | None, latency_ms: int
) -> Completion:
    from_wire = {wire: name for name, wire in names.items()}
    texts: list[str] = []
    pending: list[str] = []  # text since the last tool_use: the next call's reasoning
    calls = []
    for block in response.content:
        if block.type == "text":
            texts.append(block.text)
            pending.append(block.text)
        elif block.type == "tool_use":
            name = from_wire.get(block.name, block.name)
            if not isinstance(block.input, dict):
                raise malformed(f"arguments of {name} are not a JSON object")
            reasoning = "\n".join(pending).strip()
            calls.append(
                ToolCall(id=block.id, name=name, arguments=block.input, reasoning=reasoning)
            )
            pending = []
    text = "\n".join(texts).strip()
    parsed = parse_output(text, output_schema) if output_schema and not calls else None
    usage = response.usage
    answered_by = response.model or model
    return Completion(
        text=text,
        tool_calls=calls,
        model=answered_by,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cost_usd=cost_usd(answered_by, usage.input_tokens, usage.output_tokens),
        latency_ms=latency_ms,
        parsed=parsed,
    )


def _classify(exc: anthropic.AnthropicError) -> ProviderError:
    """429, 5xx (and 529 overloaded), timeouts and connection errors are retryable; other 4xx
    are not."""
    if isinstance(exc, anthropic.APIStatusError):
        status = exc.status_code
        return ProviderError(
            f"anthropic {status}: {exc.message}",
            retryable=is_retryable_status(status),
            status=status,
        )
    if isinstance(exc, anthropic.APIConnectionError):  # includes timeouts
        return ProviderError(f"anthropic: {exc}", retryable=True)
    return ProviderError(f"anthropic: {exc}", retryable=False)
