"""Workflows the engine itself needs."""

from orchestration.registry.declare import workflow


@workflow(
    "_agent.task",
    version=1,
    input_schema={
        "type": "object",
        "properties": {"goal": {"type": "string"}, "context": {"type": "object"}},
        "required": ["goal"],
    },
)
def agent_task(ctx, goal: str, context: dict | None = None) -> dict:
    """A handoff's child run: the agent works on the goal with the tools it was handed."""
    answer = ctx.agent(ctx.run.agent, goal=goal, context=context)
    return {"answer": answer}
