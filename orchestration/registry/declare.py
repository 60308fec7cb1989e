"""The ``@tool`` and ``@workflow`` decorators and the in-process registry they fill."""

from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from fnmatch import fnmatchcase
from functools import cached_property
from typing import Any

import jsonschema
from django.db import transaction

TOOLS: dict[str, "ToolDef"] = {}
WORKFLOWS: dict[tuple[str, int], "WorkflowDef"] = {}


class RegistryError(LookupError):
    pass


@dataclass(frozen=True, eq=False)
class ToolDef:
    name: str
    fn: Callable[..., Any]
    description: str
    schema: dict
    side_effect: str
    impact: int
    reversible: bool
    compensating_tool: str = ""
    labels_read: tuple[str, ...] = ()
    labels_produced: tuple[str, ...] = ()
    cost_per_call: Decimal = Decimal(0)
    timeout: float = 30.0
    target: str = ""  # the argument naming what the tool acts on, e.g. "order_id"
    data_subject: str = ""  # the output field naming whose personal data the output is

    @cached_property
    def validator(self) -> jsonschema.protocols.Validator:
        """Built once per tool: validating a call is then only the check itself."""
        cls = jsonschema.validators.validator_for(self.schema)
        return cls(self.schema, format_checker=cls.FORMAT_CHECKER)


@dataclass(frozen=True)
class WorkflowDef:
    name: str
    version: int
    fn: Callable[..., Any]
    description: str
    input_schema: dict = field(default_factory=dict)
    tools: tuple[str, ...] = ()  # names or fnmatch patterns: what a run without an agent may use

    def declares(self, tool: str) -> bool:
        return any(fnmatchcase(tool, pattern) for pattern in self.tools)

    def declared_tools(self) -> frozenset[str]:
        """The registered tools that its ``tools`` name."""
        return frozenset(name for name in TOOLS if self.declares(name))


def tool(
    name: str,
    *,
    schema: dict,
    side_effect: str,
    impact: int = 0,
    reversible: bool = True,
    compensating_tool: str = "",
    labels_read: tuple[str, ...] = (),
    labels_produced: tuple[str, ...] = (),
    cost_per_call: str = "0",
    timeout: float = 30.0,
    target: str = "",
    data_subject: str = "",
) -> Callable:
    """Declare a tool. The function takes its arguments as keywords plus ``idempotency_key``,
    and must drop a second call with the same key.

    ``target`` names the argument that says what the tool acts on (``order_id``): policies see
    the totals of the tool on that target. ``data_subject`` names the field of the output that
    says whose personal data the output is (``customer_email``)."""
    if target and schema.get("properties", {}).get(target, {}).get("type") != "string":
        raise ValueError(f"tool {name}: target {target!r} is not a string argument")

    def register(fn: Callable) -> Callable:
        TOOLS[name] = ToolDef(
            name=name,
            fn=fn,
            description=(fn.__doc__ or "").strip(),
            schema=schema,
            side_effect=side_effect,
            impact=impact,
            reversible=reversible,
            compensating_tool=compensating_tool,
            labels_read=tuple(labels_read),
            labels_produced=tuple(labels_produced),
            cost_per_call=Decimal(cost_per_call),
            timeout=timeout,
            target=target,
            data_subject=data_subject,
        )
        return fn

    return register


def workflow(
    name: str,
    *,
    version: int = 1,
    input_schema: dict | None = None,
    tools: list[str] | tuple[str, ...] = (),
) -> Callable:
    """Declare a workflow: ``fn(ctx, **input)``. Runs stay pinned to the version they began on.

    ``tools`` (names, or fnmatch patterns such as ``"infra.*"``) are all that a run of it
    without an agent may use, its agent loops included; a workflow that declares none may use
    none on its own. A run with an agent uses the agent's ceiling instead (or the tools handed
    to it)."""

    def register(fn: Callable) -> Callable:
        WORKFLOWS[(name, version)] = WorkflowDef(
            name=name,
            version=version,
            fn=fn,
            description=(fn.__doc__ or "").strip(),
            input_schema=input_schema or {"type": "object", "properties": {}},
            tools=tuple(tools),
        )
        return fn

    return register


def get_tool(name: str) -> ToolDef:
    try:
        return TOOLS[name]
    except KeyError:
        raise RegistryError(f"No tool named {name!r} is registered.") from None


def get_workflow(name: str, version: int | None = None) -> WorkflowDef:
    versions = sorted(v for (n, v) in WORKFLOWS if n == name)
    if not versions:
        raise RegistryError(f"No workflow named {name!r} is registered.")
    chosen = versions[-1] if version is None else version
    if (name, chosen) not in WORKFLOWS:
        raise RegistryError(f"Workflow {name!r} has no version {version}.")
    return WORKFLOWS[(name, chosen)]


def latest_workflows() -> list[WorkflowDef]:
    latest: dict[str, WorkflowDef] = {}
    for (name, _version), definition in sorted(WORKFLOWS.items()):
        if not name.startswith("_"):
            latest[name] = definition
    return list(latest.values())


# What a published policy keeps of each tool: what the gate scores it by and the labels its
# results carry (the engine records those).
POLICY_RISK_FIELDS = ("side_effect", "impact", "reversible", "labels_read", "labels_produced")
# Everything an admin may override, which a sync of the registry then leaves alone.
RISK_FIELDS = (
    "side_effect",
    "impact",
    "reversible",
    "compensating_tool",
    "labels_read",
    "labels_produced",
    "cost_per_call",
    "allow_similar_forbidden",
)


def registry_sync() -> dict[str, int]:
    """Write the declared tools to the database. Code-owned fields always follow the code; risk
    metadata follows it only until an admin has overridden it."""
    from orchestration.registry.models import Tool

    created = updated = 0
    with transaction.atomic():
        existing = {t.name: t for t in Tool.objects.select_for_update()}
        for definition in TOOLS.values():
            risk = {
                "side_effect": definition.side_effect,
                "impact": definition.impact,
                "reversible": definition.reversible,
                "compensating_tool": definition.compensating_tool,
                "labels_read": list(definition.labels_read),
                "labels_produced": list(definition.labels_produced),
                "cost_per_call": definition.cost_per_call,
            }
            row = existing.get(definition.name)
            if row is None:
                Tool.objects.create(
                    name=definition.name,
                    description=definition.description,
                    schema=definition.schema,
                    **risk,
                )
                created += 1
                continue
            row.description, row.schema, row.present_in_code = (
                definition.description,
                definition.schema,
                True,
            )
            if not row.risk_overridden:
                for key, value in risk.items():
                    setattr(row, key, value)
            row.save()
            updated += 1
        Tool.objects.exclude(name__in=TOOLS).update(present_in_code=False)
    return {"created": created, "updated": updated}
