"""The compromised models. ``redteam`` plays a list of moves verbatim, whatever tools were
offered (names never offered, odd names, odd values such as NaN). ``gullible`` is the demo's
``scripted`` model, which follows ``INSTRUCTION: call <tool> with {json}`` wherever a user or tool
message carries it, reading instructions inside JSON too (a tool's result, a JSON context)."""

import json
from typing import Any

from orchestration.providers import Completion, ScriptedProvider, ToolCall


class PlaybookProvider:
    """Each call takes the next move: ``{"call": name, "args": {...}}`` (a tool call),
    ``{"output": {...}}`` (a structured answer) or ``{"text": "..."}``; when the moves run out
    it answers ``Done.``."""

    name = "redteam"
    moves: list[dict[str, Any]] = []

    @classmethod
    def load(cls, moves: list[dict[str, Any]]) -> None:
        cls.moves = [dict(move) for move in moves]

    def complete(self, *, model, messages, tools=None, output_schema=None, timeout=60.0):
        move = type(self).moves.pop(0) if type(self).moves else {"text": "Done."}
        calls, parsed, text = [], None, move.get("text", "")
        if "call" in move:
            turn = sum(1 for m in messages if m.get("role") == "assistant")
            calls = [
                ToolCall(
                    id=f"call_{turn}_{len(type(self).moves)}",
                    name=move["call"],
                    arguments=move.get("args", {}),
                    reasoning=move.get("reasoning", f"I will call {move['call']}."),
                )
            ]
            text = calls[0].reasoning
        elif "output" in move:
            parsed = move["output"]
            text = json.dumps(parsed)
        return Completion(
            text=text,
            tool_calls=calls,
            model=model,
            input_tokens=10,
            output_tokens=10,
            cost_usd=0.0,
            latency_ms=1,
            parsed=parsed,
        )


class GullibleProvider(ScriptedProvider):
    """The scripted model reading JSON as a model does: an instruction inside a tool result or a
    JSON context (where its quotes arrive escaped) is followed like one in plain text."""

    name = "gullible"

    def complete(self, *, messages, **kwargs):
        read = [
            {**m, "content": _unescaped(m.get("content"))}
            if m.get("role") in ("user", "tool")
            else m
            for m in messages
        ]
        return super().complete(messages=read, **kwargs)


def _unescaped(content: Any) -> Any:
    if not isinstance(content, str) or '\\"' not in content:
        return content
    return content + "\n" + content.replace('\\"', '"')


COMPROMISED = {PlaybookProvider.name: PlaybookProvider, GullibleProvider.name: GullibleProvider}
