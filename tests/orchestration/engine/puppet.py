"""A compromised model for the engine's tests: whatever it was offered, turn N of a
conversation answers with ``Puppet.turns[N]``: tool calls with any name and any arguments, text,
a parsed output, even NaN or negative token counts. Deterministic per conversation, as replay
needs: the turn is the number of assistant messages so far."""

from dataclasses import dataclass, field
from typing import Any

from orchestration.providers import PROVIDERS, Completion, ToolCall


@dataclass
class Turn:
    calls: list[tuple[str, Any]] = field(default_factory=list)  # (name, arguments)
    text: str = ""
    parsed: Any = None
    tokens: int = 10


class Puppet:
    name = "puppet"
    turns: list[Turn] = []
    offered: list[list[str]] = []  # the tool names each call was offered

    @classmethod
    def install(cls, monkeypatch) -> type["Puppet"]:
        """Register as the provider ``puppet`` for one test, with no turns yet."""
        monkeypatch.setitem(PROVIDERS, cls.name, cls)
        monkeypatch.setattr(cls, "turns", [])
        monkeypatch.setattr(cls, "offered", [])
        return cls

    def complete(self, *, model, messages, tools=None, output_schema=None, timeout=60.0):
        self.offered.append([t.name for t in tools or []])
        index = sum(1 for m in messages if m.get("role") == "assistant")
        turn = self.turns[index] if index < len(self.turns) else Turn(text="Done.")
        calls = [
            ToolCall(id=f"call_{index}_{i}", name=name, arguments=args, reasoning=f"use {name}")
            for i, (name, args) in enumerate(turn.calls)
        ]
        return Completion(
            text=turn.text,
            tool_calls=calls,
            model=model,
            input_tokens=turn.tokens,
            output_tokens=0,
            cost_usd=0.0,
            latency_ms=1,
            parsed=turn.parsed,
        )
