"""The Anthropic provider, through the real SDK, against a local stand-in of the API."""

import json

import pytest

from orchestration.providers import AnthropicProvider, ProviderError, ToolSpec
from orchestration.providers.anthropic_provider import JSON_INSTRUCTION
from tests.services import free_port

LOOKUP = ToolSpec(
    name="orders.lookup",
    description="Look up an order.",
    parameters={
        "type": "object",
        "properties": {"order_id": {"type": "string"}},
        "required": ["order_id"],
    },
)


@pytest.fixture
def provider(stand_in, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_BASE_URL", stand_in.url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    return AnthropicProvider()


def message(*content: dict, model="claude-sonnet-4-20250514", usage=(100, 20)) -> dict:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": list(content),
        "stop_reason": "tool_use" if any(b["type"] == "tool_use" for b in content) else "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": usage[0], "output_tokens": usage[1]},
    }


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def tool_use(id: str, name: str, input: dict) -> dict:
    return {"type": "tool_use", "id": id, "name": name, "input": input}


def error(status: int, kind: str) -> dict:
    return {"type": "error", "error": {"type": kind, "message": f"{kind} happened"}}


def test_plain_text_answer_with_tokens_and_cost(provider, stand_in):
    stand_in.respond(message(text("Hello there."), usage=(2000, 100)))
    result = provider.complete(
        model="claude-sonnet-4", messages=[{"role": "user", "content": "Hi"}]
    )
    assert result.text == "Hello there."
    assert result.tool_calls == []
    assert (result.input_tokens, result.output_tokens) == (2000, 100)
    # claude-sonnet-4: $3 and $15 per million tokens.
    assert result.cost_usd == pytest.approx(2000 * 3e-6 + 100 * 15e-6)
    (request,) = stand_in.requests
    assert request.path == "/v1/messages"
    sent = request.headers.get("x-api-key") or request.headers["authorization"].split()[-1]
    assert sent == "sk-ant-test"
    assert request.body["max_tokens"] > 0
    assert json.loads(json.dumps(result.to_record()))["cost_usd"] == result.cost_usd


def test_tool_use_is_parsed_with_the_text_before_it_as_reasoning(provider, stand_in):
    stand_in.respond(
        message(
            text("First I look up the order."),
            tool_use("toolu_1", "orders_lookup", {"order_id": "A-1001"}),
            text("And the other one."),
            tool_use("toolu_2", "orders_lookup", {"order_id": "B-2"}),
        )
    )
    result = provider.complete(
        model="claude-3-5-haiku",
        messages=[{"role": "user", "content": "Refund A-1001"}],
        tools=[LOOKUP],
    )
    first, second = result.tool_calls
    assert (first.id, first.name, first.arguments) == (
        "toolu_1",
        "orders.lookup",
        {"order_id": "A-1001"},
    )
    assert first.reasoning == "First I look up the order."
    assert (second.arguments, second.reasoning) == ({"order_id": "B-2"}, "And the other one.")
    assert result.text == "First I look up the order.\nAnd the other one."


def test_request_carries_system_tools_and_tool_results(provider, stand_in):
    stand_in.respond(message(text("Refunded.")))
    messages = [
        {"role": "system", "content": "You are careful."},
        {"role": "user", "content": "Refund A-1001"},
        {
            "role": "assistant",
            "content": "Looking both up.",
            "tool_calls": [
                {"id": "t1", "name": "orders.lookup", "arguments": {"order_id": "A-1001"}},
                {"id": "t2", "name": "orders.lookup", "arguments": {"order_id": "B-2"}},
            ],
        },
        {"role": "tool", "tool_call_id": "t1", "name": "orders.lookup", "content": "paid"},
        {"role": "tool", "tool_call_id": "t2", "name": "orders.lookup", "content": "open"},
    ]
    provider.complete(model="claude-sonnet-4", messages=messages, tools=[LOOKUP])
    body = stand_in.requests[0].body
    assert body["system"] == "You are careful."
    assert body["messages"] == [
        {"role": "user", "content": [text("Refund A-1001")]},
        {
            "role": "assistant",
            "content": [
                text("Looking both up."),
                tool_use("t1", "orders_lookup", {"order_id": "A-1001"}),
                tool_use("t2", "orders_lookup", {"order_id": "B-2"}),
            ],
        },
        {
            "role": "user",  # both results in one turn
            "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "paid"},
                {"type": "tool_result", "tool_use_id": "t2", "content": "open"},
            ],
        },
    ]
    assert body["tools"] == [
        {
            "name": "orders_lookup",
            "description": "Look up an order.",
            "input_schema": LOOKUP.parameters,
        }
    ]


def test_rate_limit_is_retryable_and_not_retried_by_the_sdk(provider, stand_in):
    stand_in.respond(error(429, "rate_limit_error"), status=429)
    stand_in.respond(message(text("Second time lucky.")))
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ProviderError) as caught:
        provider.complete(model="claude-sonnet-4", messages=messages)
    assert caught.value.retryable is True
    assert caught.value.status == 429
    assert len(stand_in.requests) == 1  # the SDK did not retry
    assert (
        provider.complete(model="claude-sonnet-4", messages=messages).text == "Second time lucky."
    )
    assert len(stand_in.requests) == 2


@pytest.mark.parametrize(
    ("status", "kind", "retryable"),
    [
        (400, "invalid_request_error", False),
        (403, "permission_error", False),
        (500, "api_error", True),
        (529, "overloaded_error", True),
    ],
)
def test_status_errors_are_classified(provider, stand_in, status, kind, retryable):
    stand_in.respond(error(status, kind), status=status)
    with pytest.raises(ProviderError) as caught:
        provider.complete(model="claude-sonnet-4", messages=[{"role": "user", "content": "Hi"}])
    assert (caught.value.status, caught.value.retryable) == (status, retryable)
    assert len(stand_in.requests) == 1


def test_timeout_and_connection_errors_are_retryable(provider, stand_in, monkeypatch):
    stand_in.respond(message(text("too late")), delay=1.0)
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ProviderError) as caught:
        provider.complete(model="claude-sonnet-4", messages=messages, timeout=0.2)
    assert (caught.value.retryable, caught.value.status) == (True, None)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ProviderError) as caught:
        provider.complete(model="claude-sonnet-4", messages=messages)
    assert caught.value.retryable is True


def test_missing_api_key_is_not_retryable(provider, stand_in, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    with pytest.raises(ProviderError, match="ANTHROPIC_API_KEY") as caught:
        provider.complete(model="claude-sonnet-4", messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.retryable is False
    assert stand_in.requests == []


SCHEMA = {
    "type": "object",
    "properties": {"approved": {"type": "boolean"}},
    "required": ["approved"],
}


def test_output_schema_is_asked_for_in_the_system_prompt_and_parsed(provider, stand_in):
    stand_in.respond(message(text('```json\n{"approved": false}\n```')))
    result = provider.complete(
        model="claude-sonnet-4",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ok?"}],
        output_schema=SCHEMA,
    )
    assert result.parsed == {"approved": False}
    system = stand_in.requests[0].body["system"]
    assert system.startswith("Be brief.\n\n" + JSON_INSTRUCTION)
    assert json.loads(system.split(JSON_INSTRUCTION)[1]) == SCHEMA


@pytest.mark.parametrize("answer", ["Sure! approved", '{"approved": 1}', '{"approved": true'])
def test_malformed_json_output_is_retryable(provider, stand_in, answer):
    stand_in.respond(message(text(answer)))
    with pytest.raises(ProviderError, match="malformed JSON") as caught:
        provider.complete(
            model="claude-sonnet-4",
            messages=[{"role": "user", "content": "Ok?"}],
            output_schema=SCHEMA,
        )
    assert caught.value.retryable is True
