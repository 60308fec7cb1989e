"""One policy decision: canonical action, least privilege, risk score, rules and thresholds.

The evaluation context is built once per decision; rules come from the policy's per-tool index.
Precedence is deny over ask over allow; where no rule decides, the agent's autonomy thresholds
do. A rule whose condition errors counts as matched with its own outcome or a stricter one (an
erroring allow asks), so a broken rule can never weaken the policy."""

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from typing import Any

import cel
from django.db.models import Count, Q
from django.utils import timezone

from approvals.policy.aggregates import totals
from approvals.policy.cel import EvaluationError, cel_context, compile_condition, evaluate
from approvals.policy.compiled import CompiledPolicy, current_policy
from approvals.policy.risk import risk_score
from approvals.policy.taint import run_taint
from orchestration.canonical import action_hash, canonical_args
from orchestration.gate import Action
from orchestration.registry.declare import POLICY_RISK_FIELDS, RegistryError, get_workflow
from orchestration.registry.models import Agent, AgentStatus
from orchestration.runs.models import Run

STRICTER = {"allow": "ask", "ask": "ask", "deny": "deny"}
RANK = {"allow": 0, "ask": 1, "deny": 2}
DEFAULT_THRESHOLDS = {"allow_below": 20, "deny_above": 90, "quorum2_above": 70}
DEFAULT_OBLIGATIONS = {
    "team": "",
    "quorum": 1,
    "deadline_minutes": 60,
    "on_expiry": "deny",
    "escalation_team": "",
    "message": "",
    "allow_similar": False,
}


@dataclass
class Decision:
    outcome: str  # allow | ask | deny
    reason: str
    action_hash: str
    args: dict[str, Any]
    score: int = 0
    factors: list[dict[str, Any]] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    deciding_rules: list[str] = field(default_factory=list)  # of ``rules``, those that decided
    shadow_rules: list[str] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    obligations: dict[str, Any] | None = None
    policy_version: int = 0
    input: dict[str, Any] = field(default_factory=dict)
    agent_id: int | None = None  # the agent acting, whose grants, rules and thresholds applied
    agent_name: str = ""


def _agent_record(agent_name: str) -> dict[str, Any]:
    """The agent's recent record: how many of its actions reviewers rejected, how many failed."""
    from approvals.policy.models import PolicyEvaluation
    from approvals.queue.models import ApprovalRequest
    from orchestration.runs.models import Step

    since = timezone.now() - timedelta(days=7)
    actions = PolicyEvaluation.objects.filter(agent=agent_name, created_at__gte=since).count()
    requests = ApprovalRequest.objects.filter(agent=agent_name, created_at__gte=since).aggregate(
        decided=Count("pk", filter=~Q(status__in=["pending", "escalated", "superseded"])),
        rejected=Count("pk", filter=Q(status="rejected")),
    )
    steps = (
        Step.objects.filter(run__agent__name=agent_name, kind="tool", started_at__gte=since)
        .exclude(status__in=["started", "waiting"])
        .aggregate(
            total=Count("pk"),
            errors=Count(
                "pk",
                filter=Q(status="failed") & ~Q(error_type__in=["ActionDenied", "ActionRejected"]),
            ),
        )
    )
    decided_count, rejected = requests["decided"], requests["rejected"]
    total_steps, errors = steps["total"], steps["errors"]
    return {
        "actions": actions,
        "reject_rate": round(rejected / decided_count, 3) if decided_count else 0.0,
        "error_rate": round(errors / total_steps, 3) if total_steps else 0.0,
    }


def acting_agent(action: Action, run: Run) -> Agent | None:
    """Whose rights apply: the agent the action names (the one acting, e.g. inside
    ``ctx.agent``), else the run's. None for a workflow acting without an agent, and for a
    named agent that does not exist (which is denied everything)."""
    if action.agent is None or (run.agent is not None and run.agent.name == action.agent):
        return run.agent
    return Agent.objects.filter(name=action.agent).first()


def _agent_context(agent: Agent | None, name: str | None) -> dict[str, Any]:
    """The acting agent as rules see it: its autonomy, status and recent record."""
    if agent is None:
        return {
            "name": name or "",
            "autonomy": "supervised",
            "status": "unknown" if name else AgentStatus.ACTIVE.value,
            "record": {"actions": 0, "reject_rate": 0.0, "error_rate": 0.0},
        }
    return {
        "name": agent.name,
        "autonomy": agent.autonomy,
        "status": agent.status,
        "record": _agent_record(agent.name),
    }


def run_answers(run: Run) -> list[dict[str, Any]]:
    """The questions of the run and of its parent that reviewers answered (a customer's pick),
    oldest first, each ``{"about": ..., "answer": ...}``: ``about`` is what the workflow's code
    said the answer decides (``ctx.ask_human(..., about={"guest": ...})``), never text a model
    wrote, so a rule binds a pick exactly: ``run.answers.exists(a, a.answer == args.hotel &&
    a.about.guest == args.guest)``. Canonical like arguments. One indexed query; ancestors above
    the parent are not read."""
    from approvals.queue.models import ApprovalRequest, RequestKind, RequestStatus

    answered = ApprovalRequest.objects.filter(
        run_id__in=[run.pk] if run.parent_id is None else [run.pk, run.parent_id],
        kind=RequestKind.QUESTION,
        status=RequestStatus.APPROVED,
    ).order_by("id")
    pairs = [{"about": about, "answer": a} for about, a in answered.values_list("args", "answer")]
    return canonical_args({"answers": pairs})["answers"]


def build_context(
    action: Action, run: Run, policy: CompiledPolicy, *, agent: Agent | None = None
) -> dict[str, Any]:
    """The evaluation input, JSON-serialisable so that it can be stored and replayed.
    ``agent``: the acting agent when the caller has it (see ``acting_agent``)."""
    from orchestration.registry.models import Tool

    args = canonical_args(action.args)
    tool_meta = policy.tools.get(action.tool)
    if tool_meta is None:  # declared after the last publish: its live metadata
        row = Tool.objects.filter(name=action.tool).values(*POLICY_RISK_FIELDS).first()
        tool_meta = row or {
            "side_effect": "other",
            "impact": 2,
            "reversible": False,
            "labels_read": [],
            "labels_produced": [],
        }
    agent = agent or acting_agent(action, run)
    taint = run_taint(run.pk, args, step_seq=action.step_seq, tools=policy.tools)
    data = {
        "action": {
            "tool": action.tool,
            "args": args,
            "hash": action_hash(action.tool, args),
            "labels": sorted(taint.carried),
            "reasoning": action.reasoning,
            "confidence": action.confidence if action.confidence is not None else -1.0,
        },
        "args": args,
        "tool": {
            "name": action.tool,
            **{k: tool_meta[k] for k in POLICY_RISK_FIELDS},
        },
        "agent": _agent_context(agent, action.agent),
        "run": {
            "id": run.pk,
            "workflow": run.workflow,
            "intent": {
                "goal": (run.intent or {}).get("goal", ""),
                "constraints": list((run.intent or {}).get("constraints", [])),
            },
            "boundaries": list((run.intent or {}).get("boundaries", [])),
            "labels": sorted(set(action.labels) | taint.touched | taint.carried),
            "data_subject": taint.data_subject,
            "data_subjects": list(taint.data_subjects),
            "cost_usd": float(run.cost_usd),
            "steps": run.steps,
            "answers": run_answers(run),
        },
        "now": timezone.now().isoformat(),
    }
    data["totals"] = totals(
        tool=action.tool,
        args=args,
        run_id=run.pk,
        step_seq=action.step_seq,
        agent=data["agent"]["name"],
    )
    return data


def _cel_context(data: dict[str, Any]) -> cel.Context:
    values = {**data, "now": datetime.fromisoformat(data["now"]).astimezone(UTC)}
    return cel_context(values)


def _grant_problem(data: dict[str, Any], run: Run) -> str:
    """Least privilege for whoever acts, as the engine confines it: within the run's limit,
    and for an agent also within its ceiling and an active grant."""
    from approvals.policy.models import Grant

    tool = data["action"]["tool"]
    name = data["agent"]["name"]
    problem = _beyond_run(tool, run, acting=name)
    if problem or not name:
        return problem
    agent = run.agent if run.agent and run.agent.name == name else None
    agent = agent or Agent.objects.filter(name=name).first()
    if agent is None:
        return f"agent {name} is not registered"
    if not agent.tools.filter(name=tool).exists():
        return f"tool {tool} is beyond the ceiling of agent {name}"
    now = timezone.now()
    grants = (
        Grant.objects.filter(agent=agent, revoked_at__isnull=True)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        .filter(Q(run_id__isnull=True) | Q(run_id=run.pk))
    )
    for grant in grants:
        if not fnmatchcase(tool, grant.tool_pattern):
            continue
        if grant.max_uses is not None and grant.uses >= grant.max_uses:
            continue
        if grant.condition:
            try:
                if not evaluate(compile_condition(grant.condition), _cel_context(data)):
                    continue
            except EvaluationError:
                continue  # a grant that cannot be checked grants nothing
        return ""
    return f"tool {tool} is not granted to agent {name}"


def _beyond_run(tool: str, run: Run, *, acting: str) -> str:
    """The run's limit: the tools handed to it, else its agent's ceiling (checked with the
    grants when that agent acts), else what its workflow declares."""
    if run.allowed_tools is not None:
        if tool in run.allowed_tools:
            return ""
        return f"tool {tool} is not among the tools handed to run {run.pk}"
    if run.agent is not None:
        if run.agent.name == acting or run.agent.tools.filter(name=tool).exists():
            return ""
        return f"tool {tool} is beyond the ceiling of agent {run.agent.name}, whose run this is"
    try:
        declared = get_workflow(run.workflow, run.workflow_version).declares(tool)
    except RegistryError:
        declared = False
    if declared:
        return ""
    return f"tool {tool} is not declared by workflow {run.workflow} v{run.workflow_version}"


def decide(action: Action, run: Run, *, policy: CompiledPolicy | None = None) -> Decision:
    """Decide for the agent acting (``acting_agent``): its grants, ceiling, status, rules,
    thresholds and record apply, and the decision names it."""
    policy = policy or current_policy()
    agent = acting_agent(action, run)
    data = build_context(action, run, policy, agent=agent)
    decision = decide_on(data, policy, run=run)
    decision.agent_id = agent.pk if agent else None
    decision.agent_name = data["agent"]["name"]
    return decision


def decide_on(data: dict[str, Any], policy: CompiledPolicy, *, run: Run | None = None) -> Decision:
    """Decide on a stored evaluation input (live decisions and simulation share this)."""
    tool = data["action"]["tool"]
    ctx = _cel_context(data)
    factors, score = risk_score(data, policy, ctx)
    data = {**data, "risk": {"score": score, "factors": factors}}
    ctx.add_variable("risk", data["risk"])
    result = Decision(
        outcome="allow",
        reason="",
        action_hash=data["action"]["hash"],
        args=data["args"],
        score=score,
        factors=factors,
        policy_version=policy.version,
        input=data,
    )

    if data["agent"]["status"] != AgentStatus.ACTIVE:  # paused, suspended, unknown
        return _deny(result, f"agent {data['agent']['name']} is {data['agent']['status']}")
    if run is not None:
        problem = _grant_problem(data, run)
        if problem:
            return _deny(result, problem)
    for boundary in data["run"]["boundaries"]:
        try:
            held = evaluate(compile_condition(boundary), ctx)
        except (EvaluationError, ValueError) as exc:
            return _deny(result, f"run boundary {boundary!r} could not be checked: {exc}")
        if not held:
            return _deny(result, f"run boundary violated: {boundary}")

    matched: list[tuple[Any, str]] = []
    for rule in policy.rules_for(tool):
        if not rule.in_scope(agent=data["agent"]["name"], workflow=data["run"]["workflow"]):
            continue
        outcome = rule.outcome
        try:
            hit = evaluate(rule.program, ctx)
        except EvaluationError as exc:
            hit, outcome = True, STRICTER[rule.outcome]
            result.errors.append({"rule": rule.name, "rule_id": rule.id, "error": str(exc)})
        if not hit:
            continue
        if rule.mode == "shadow":
            result.shadow_rules.append(rule.name)
        else:
            matched.append((rule, outcome))

    if matched:
        worst = max(RANK[outcome] for _, outcome in matched)
        deciding = [(rule, o) for rule, o in matched if RANK[o] == worst]
        result.rules = [rule.name for rule, _ in matched]
        result.deciding_rules = [rule.name for rule, _ in deciding]
        result.outcome = deciding[0][1]
        names = ", ".join(rule.name for rule, _ in deciding)
        result.reason = f"rule {names}"
        if result.outcome == "ask":
            result.obligations = _merge_obligations([rule.obligations for rule, _ in deciding])
        return result

    thresholds = {**DEFAULT_THRESHOLDS, **policy.thresholds.get(data["agent"]["autonomy"], {})}
    autonomy = data["agent"]["autonomy"]
    if score < thresholds["allow_below"]:
        result.reason = f"risk {score} is below {autonomy}'s allow threshold"
    elif score > thresholds["deny_above"]:
        _deny(result, f"risk {score} is above {autonomy}'s deny threshold")
    else:
        result.outcome = "ask"
        result.reason = f"risk {score} needs a reviewer at {autonomy} autonomy"
        quorum = 2 if score > thresholds["quorum2_above"] else 1
        result.obligations = {**DEFAULT_OBLIGATIONS, "quorum": quorum}
    return result


def _deny(result: Decision, reason: str) -> Decision:
    result.outcome, result.reason = "deny", reason
    return result


def _merge_obligations(all_obligations: list[dict[str, Any]]) -> dict[str, Any]:
    """Several ask rules: the strictest of each (highest quorum, earliest deadline); the team and
    message of the first (highest priority) rule."""
    merged = {**DEFAULT_OBLIGATIONS, **all_obligations[0]}
    for obligations in all_obligations[1:]:
        merged["quorum"] = max(merged["quorum"], obligations.get("quorum", 1))
        merged["deadline_minutes"] = min(
            merged["deadline_minutes"], obligations.get("deadline_minutes", 60)
        )
        merged["allow_similar"] = merged["allow_similar"] and obligations.get("allow_similar")
    return merged
