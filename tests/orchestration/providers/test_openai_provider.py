"""The OpenAI provider, through the real SDK, against a local stand-in of the API."""

import json

import pytest

from orchestration.providers import OpenAIProvider, ProviderError, ToolSpec, cost_usd
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
    monkeypatch.setenv("OPENAI_BASE_URL", f"{stand_in.url}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    return OpenAIProvider()


def chat(content: str | None, *, tool_calls=None, model="gpt-4o-2024-08-06", usage=(100, 20)):
    message = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if tool_calls else "stop",
            }
        ],
        "usage": {
            "prompt_tokens": usage[0],
            "completion_tokens": usage[1],
            "total_tokens": sum(usage),
        },
    }


def error(status: int, message: str) -> dict:
    return {"error": {"message": message, "type": "error", "code": str(status)}}


def test_plain_text_answer_with_tokens_and_cost(provider, stand_in):
    stand_in.respond(chat("Hello there.", usage=(1000, 500)))
    result = provider.complete(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert result.text == "Hello there."
    assert result.tool_calls == []
    assert (result.input_tokens, result.output_tokens) == (1000, 500)
    assert result.model == "gpt-4o-2024-08-06"
    # The dated model is priced as gpt-4o: $2.50 and $10 per million tokens.
    assert result.cost_usd == pytest.approx(1000 * 2.5e-6 + 500 * 10e-6)
    assert result.parsed is None
    assert result.latency_ms >= 0
    (request,) = stand_in.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.body["model"] == "gpt-4o"
    assert json.loads(json.dumps(result.to_record()))["text"] == "Hello there."


def test_tool_call_is_parsed_with_arguments_and_reasoning(provider, stand_in):
    stand_in.respond(
        chat(
            "I need the order first.",
            tool_calls=[
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "orders_lookup", "arguments": '{"order_id": "A-1001"}'},
                }
            ],
        )
    )
    result = provider.complete(
        model="gpt-4o", messages=[{"role": "user", "content": "Refund A-1001"}], tools=[LOOKUP]
    )
    (call,) = result.tool_calls
    assert call.id == "call_1"
    assert call.name == "orders.lookup"  # mapped back from the vendor-safe name
    assert call.arguments == {"order_id": "A-1001"}
    assert call.reasoning == "I need the order first."
    assert result.to_record()["tool_calls"][0]["arguments"] == {"order_id": "A-1001"}


def test_request_carries_translated_messages_and_tools(provider, stand_in):
    stand_in.respond(chat("Refunded."))
    messages = [
        {"role": "system", "content": "You are careful."},
        {"role": "user", "content": "Refund A-1001"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "name": "orders.lookup", "arguments": {"order_id": "A-1"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "name": "orders.lookup", "content": "paid"},
    ]
    provider.complete(model="gpt-4o", messages=messages, tools=[LOOKUP])
    body = stand_in.requests[0].body
    assert body["messages"] == [
        {"role": "system", "content": "You are careful."},
        {"role": "user", "content": "Refund A-1001"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "orders_lookup", "arguments": '{"order_id": "A-1"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "paid"},
    ]
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "orders_lookup",
                "description": "Look up an order.",
                "parameters": LOOKUP.parameters,
            },
        }
    ]


def test_rate_limit_is_retryable_and_not_retried_by_the_sdk(provider, stand_in):
    stand_in.respond(error(429, "slow down"), status=429)
    stand_in.respond(chat("Second time lucky."))
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ProviderError) as caught:
        provider.complete(model="gpt-4o", messages=messages)
    assert caught.value.retryable is True
    assert caught.value.status == 429
    assert len(stand_in.requests) == 1  # the SDK did not retry
    assert provider.complete(model="gpt-4o", messages=messages).text == "Second time lucky."
    assert len(stand_in.requests) == 2


@pytest.mark.parametrize(("status", "retryable"), [(400, False), (401, False), (503, True)])
def test_status_errors_are_classified(provider, stand_in, status, retryable):
    stand_in.respond(error(status, "nope"), status=status)
    with pytest.raises(ProviderError) as caught:
        provider.complete(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert (caught.value.status, caught.value.retryable) == (status, retryable)
    assert len(stand_in.requests) == 1


def test_timeout_is_retryable(provider, stand_in):
    stand_in.respond(chat("too late"), delay=1.0)
    with pytest.raises(ProviderError) as caught:
        provider.complete(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], timeout=0.2)
    assert caught.value.retryable is True
    assert caught.value.status is None
    assert len(stand_in.requests) == 1


def test_connection_error_is_retryable(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    provider = OpenAIProvider(base_url=f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(ProviderError) as caught:
        provider.complete(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.retryable is True


def test_missing_api_key_is_not_retryable(provider, stand_in, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ProviderError, match="OPENAI_API_KEY") as caught:
        provider.complete(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.retryable is False
    assert stand_in.requests == []


SCHEMA = {
    "type": "object",
    "properties": {"approved": {"type": "boolean"}},
    "required": ["approved"],
}


def test_output_schema_is_sent_and_parsed(provider, stand_in):
    stand_in.respond(chat('{"approved": true}'))
    result = provider.complete(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Ok?"}], output_schema=SCHEMA
    )
    assert result.parsed == {"approved": True}
    response_format = stand_in.requests[0].body["response_format"]
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["schema"] == SCHEMA


@pytest.mark.parametrize("text", ["not json", '{"approved": "yes"}', "[true]"])
def test_malformed_json_output_is_retryable(provider, stand_in, text):
    stand_in.respond(chat(text))
    with pytest.raises(ProviderError, match="malformed JSON") as caught:
        provider.complete(
            model="gpt-4o", messages=[{"role": "user", "content": "Ok?"}], output_schema=SCHEMA
        )
    assert caught.value.retryable is True


def test_malformed_tool_arguments_are_retryable(provider, stand_in):
    call = {"id": "c", "type": "function", "function": {"name": "orders_lookup", "arguments": "{"}}
    stand_in.respond(chat(None, tool_calls=[call]))
    with pytest.raises(ProviderError, match="malformed JSON") as caught:
        provider.complete(
            model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], tools=[LOOKUP]
        )
    assert caught.value.retryable is True


def test_cost_of_unknown_model_is_zero():
    assert cost_usd("mystery-model", 1000, 1000) == 0.0
    assert cost_usd("gpt-4o-mini-2024-07-18", 1_000_000, 0) == pytest.approx(0.15)
