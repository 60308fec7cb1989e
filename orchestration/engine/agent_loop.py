"""``ctx.agent``: plan, act, observe. Each model turn is a step and each tool call is a step
carrying the model's stated reasoning. The loop itself is plain replayable code."""

from typing import TYPE_CHECKING, Any

from orchestration.canonical import canonical_json
from orchestration.engine.errors import ActionDenied, ActionRejected, InvalidArguments, StepFailed

NAME_LENGTH = 200  # a step's name: a model may return any text as a tool's name

if TYPE_CHECKING:
    from orchestration.engine.context import Context
    from orchestration.registry.models import Agent


def run_agent_loop(
    ctx: "Context",
    agent: "Agent",
    *,
    goal: str,
    tools: list[str] | None,
    max_steps: int,
    context: dict | None,
) -> str:
    intent = ctx.run.intent or {}
    system = agent.description or f"You are {agent.name}."
    if intent.get("constraints"):
        system += "\nConstraints: " + "; ".join(intent["constraints"])
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    user = goal if not context else f"{goal}\n\nContext: {canonical_json(context)}"
    messages.append({"role": "user", "content": user})

    with ctx.acting_as(agent, tools) as offered:
        for turn in range(1, max_steps + 1):
            reply = ctx.llm(
                messages,
                tools=offered,
                name=f"{agent.name} turn {turn}",
                provider=agent.provider,
                model=agent.model,
            )
            calls = reply["tool_calls"]
            if not calls:
                return reply["text"]
            messages.append({"role": "assistant", "content": reply["text"], "tool_calls": calls})
            for call in calls:
                observation = _act(ctx, call)
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": call["id"],
                        "name": call["name"],
                        "content": canonical_json(observation),
                    }
                )
    return f"Stopped after {max_steps} turns without a final answer."


def _act(ctx: "Context", call: dict) -> Any:
    """One call the model returned: whatever it names and carries, the outcome is an
    observation (a tool it was not offered, or unknown, included), never a failed run."""
    try:
        return ctx.act(
            str(call.get("name", ""))[:NAME_LENGTH],
            call.get("arguments", {}),
            reasoning=str(call.get("reasoning", "")),
            confidence=call.get("confidence"),
        )
    except ActionDenied as exc:
        return {"error": f"denied: {exc.reason}"}
    except ActionRejected as exc:
        return {"error": f"rejected by a reviewer: {exc.reason}"}
    except (InvalidArguments, StepFailed) as exc:
        return {"error": str(exc)}
