"""OpenAI-compatible chat completions with tool calling, through the official SDK.

Configured from the environment at call time: ``OPENAI_BASE_URL`` (default the SDK's) and
``OPENAI_API_KEY`` (required). The SDK's own retries are off; errors are classified instead.
"""

import json
import time

import openai

from .base import (
    Completion,
    ProviderError,
    ToolCall,
    ToolSpec,
    cost_usd,
    is_retryable_status,
    message_text,
    parse_arguments,
    parse_output,
    vendor_endpoint,
    wire_names,
)


class OpenAIProvider:
    """A :class:`~orchestration.providers.base.Provider` for OpenAI-compatible APIs."""

    name = "openai"

    def __init__(self, *, base_url: str | None = None, api_key: str | None = None) -> None:
        self.base_url = base_url
        self.api_key = api_key

    def complete(
        self,
        *,
        model: str,
        messages: list[dict],
        tools: list[ToolSpec] | None = None,
        output_schema: dict | None = None,
        timeout: float = 60.0,
    ) -> Completion:
        api_key, base_url = vendor_endpoint("openai", api_key=self.api_key, base_url=self.base_url)
        names = wire_names(messages, tools)
        request: dict = {"model": model, "messages": to_openai_messages(messages, names)}
        if tools:
            request["tools"] = [_tool(tool, names) for tool in tools]
        if output_schema is not None:
            request["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": output_schema, "strict": False},
            }
        started = time.monotonic()
        try:
            with openai.OpenAI(
                base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout
            ) as client:
                response = client.chat.completions.create(**request)
        except openai.OpenAIError as exc:
            raise _classify(exc) from exc
        latency_ms = round((time.monotonic() - started) * 1000)
        return _completion(response, model, names, output_schema, latency_ms)


def to_openai_messages(messages: list[dict], names: dict[str, str]) -> list[dict]:
    """Neutral messages in the chat-completions format."""
    result = []
    for message in messages:
        role, content = message.get("role"), message_text(message)
        if role in ("system", "user"):
            result.append({"role": role, "content": content})
        elif role == "assistant":
            item: dict = {"role": "assistant", "content": content or None}
            if message.get("tool_calls"):
                item["tool_calls"] = [
                    {
                        "id": call["id"],
                        "type": "function",
                        "function": {
                            "name": names.get(call["name"], call["name"]),
                            "arguments": json.dumps(call.get("arguments") or {}),
                        },
                    }
                    for call in message["tool_calls"]
                ]
            result.append(item)
        elif role == "tool":
            result.append(
                {"role": "tool", "tool_call_id": message["tool_call_id"], "content": content}
            )
        else:
            raise ProviderError(f"unknown message role {role!r}", retryable=False)
    return result


def _tool(tool: ToolSpec, names: dict[str, str]) -> dict:
    return {
        "type": "function",
        "function": {
            "name": names[tool.name],
            "description": tool.description,
            "parameters": tool.parameters,
        },
    }


def _completion(
    response, model: str, names: dict[str, str], output_schema: dict | None, latency_ms: int
) -> Completion:
    if not response.choices:
        raise ProviderError("the model returned no choices", retryable=True)
    message = response.choices[0].message
    if getattr(message, "refusal", None):
        raise ProviderError(f"the model refused: {message.refusal}", retryable=False)
    text = message.content or ""
    from_wire = {wire: name for name, wire in names.items()}
    calls = []
    for call in message.tool_calls or []:
        function = getattr(call, "function", None)
        if function is None:  # not a function call (e.g. a custom tool); none are offered
            continue
        name = from_wire.get(function.name, function.name)
        arguments = parse_arguments(function.arguments, name)
        calls.append(ToolCall(id=call.id, name=name, arguments=arguments, reasoning=text))
    parsed = parse_output(text, output_schema) if output_schema and not calls else None
    usage = response.usage
    input_tokens = usage.prompt_tokens if usage else 0
    output_tokens = usage.completion_tokens if usage else 0
    answered_by = response.model or model
    return Completion(
        text=text,
        tool_calls=calls,
        model=answered_by,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost_usd=cost_usd(answered_by, input_tokens, output_tokens),
        latency_ms=latency_ms,
        parsed=parsed,
    )


def _classify(exc: openai.OpenAIError) -> ProviderError:
    """429, 5xx, timeouts and connection errors are retryable; other 4xx are not."""
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        return ProviderError(
            f"openai {status}: {exc.message}", retryable=is_retryable_status(status), status=status
        )
    if isinstance(exc, openai.APIConnectionError):  # includes timeouts
        return ProviderError(f"openai: {exc}", retryable=True)
    return ProviderError(f"openai: {exc}", retryable=False)
