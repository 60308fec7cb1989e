"""``ctx.agent``: plan, act, observe. Each model turn is a step and each tool call is a step
carrying the model's stated reasoning. The loop itself is plain replayable code."""

from typing import TYPE_CHECKING, Any

from orchestration.canonical import canonical_json
from orchestration.engine.errors import ActionDenied, ActionRejected, InvalidArguments, StepFailed

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
    usable = ctx.usable_tools()
    ceiling = set(agent.tools.values_list("name", flat=True))
    offered = [
        t for t in (tools or sorted(ceiling)) if t in ceiling and (usable is None or t in usable)
    ]
    intent = ctx.run.intent or {}
    system = agent.description or f"You are {agent.name}."
    if intent.get("constraints"):
        system += "\nConstraints: " + "; ".join(intent["constraints"])
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    user = goal if not context else f"{goal}\n\nContext: {canonical_json(context)}"
    messages.append({"role": "user", "content": user})

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
    try:
        return ctx.tool(
            call["name"],
            _reasoning=call.get("reasoning", ""),
            _confidence=call.get("confidence"),
            **call.get("arguments", {}),
        )
    except ActionDenied as exc:
        return {"error": f"denied: {exc.reason}"}
    except ActionRejected as exc:
        return {"error": f"rejected by a reviewer: {exc.reason}"}
    except (InvalidArguments, StepFailed) as exc:
        return {"error": str(exc)}
