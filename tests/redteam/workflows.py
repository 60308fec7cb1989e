"""Workflows the red team runs besides the demo's own: an agent at work on a goal (a customer's
email, retrieved documents), agents one after another in one run (nested loops), and a handoff.
They are thin shells around ``ctx.agent`` and ``ctx.handoff``: what happens is up to the model,
the gate and the engine."""

from orchestration.canonical import canonical_json
from orchestration.registry.declare import workflow

TASK_INPUT = {
    "type": "object",
    "properties": {
        "agent": {"type": "string"},
        "goal": {"type": "string"},
        "context": {"type": "object"},
        "tools": {"type": "array", "items": {"type": "string"}},
        "retrieve": {"type": "string"},
        "max_steps": {"type": "integer", "minimum": 1},
    },
    "required": ["agent", "goal"],
}


@workflow("redteam_agent_task", version=1, input_schema=TASK_INPUT)
def agent_task(
    ctx,
    agent: str,
    goal: str,
    context: dict | None = None,
    tools: list[str] | None = None,
    retrieve: str = "",
    max_steps: int = 8,
) -> dict:
    """An agent works on a goal; retrieved documents, if asked for, are quoted in it."""
    if retrieve:
        snippets = ctx.retrieve(retrieve, k=3)
        goal += "\n\nDocuments:\n" + "\n".join(f"{s['title']}: {s['text']}" for s in snippets)
    answer = ctx.agent(
        agent, goal=goal, tools=tools or None, context=context or None, max_steps=max_steps
    )
    return {"answer": answer}


@workflow(
    "redteam_relay",
    version=1,
    input_schema={
        "type": "object",
        "properties": {"loops": {"type": "array", "items": {"type": "object"}, "minItems": 1}},
        "required": ["loops"],
    },
)
def relay(ctx, loops: list[dict]) -> dict:
    """Agents work one after another in one run, each on what the previous ones found (tool
    chaining across agents, a nested loop of another agent)."""
    found: list[str] = []
    for loop in loops:
        goal = loop["goal"] + (f"\n\nWhat colleagues found: {' '.join(found)}" if found else "")
        found.append(
            ctx.agent(
                loop["agent"],
                goal=goal,
                tools=loop.get("tools"),
                context=loop.get("context"),
                max_steps=loop.get("max_steps", 6),
            )
        )
    return {"answers": found}


@workflow(
    "redteam_handoff",
    version=1,
    input_schema={
        "type": "object",
        "properties": {
            "to": {"type": "string"},
            "goal": {"type": "string"},
            "context": {"type": "object"},
        },
        "required": ["to", "goal"],
    },
)
def handoff(ctx, to: str, goal: str, context: dict | None = None) -> dict:
    """The run's agent hands a goal to another agent."""
    result = ctx.handoff(to, goal=goal, context=context or {})
    return {"result": canonical_json(result)}
