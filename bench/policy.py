"""The cost of one policy decision with 10, 200 and 2,000 rules, beside one CEL evaluation.

    .venv/bin/python bench/policy.py [ITERATIONS]
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/baton .venv/bin/python bench/policy.py

Runs on SQLite by default; set DATABASE_URL for PostgreSQL. A scratch test database is created
and dropped here (as bench/audit.py does); only the grant check and the full ``decide`` use it.

- decision: ``decide_on(input, CompiledPolicy)`` on a prepared evaluation input, as a live
  decision makes it after ``build_context``: the CEL context built from the input, the risk score
  with its argument factors, the run boundaries and every in-scope rule of the tool, without the
  database. The rules are spread round-robin over 39 tool patterns (33 tools, 5 wildcards such
  as ``payments.*``, and rules for every tool), with conditions like ``args.amount > 500.0``,
  ``"pii" in action.labels && !args.to.endsWith("@baton.example")``,
  ``agent.record.reject_rate > 0.2`` and ``risk.score > 70``, a quarter of them scoped to agents
  and a tenth in shadow mode. The action decided is a refund, the tool most rules cover (its own
  pattern and ``payments.*``); a mix of four tools is shown as context.
- one CEL: ``cel.Program.execute`` of ``args.amount > 500.0`` on a ``cel.Context`` of the same
  input, measured in the same run: ``ratio_to_one_cel`` = decision p50 / CEL p50.
- grant check: ``_grant_problem`` with 50 grants of the agent (one query and a scan; the
  matching grant sorts last and has a condition), and the full ``decide`` (``build_context``:
  the agent's record and the labels by value, then the grant check and ``decide_on``), both on
  the scratch database, as context lines.

Prints context lines (per size: compile time, rules in scope, outcome; a breakdown of the
200-rule decision into its parts, and the cost of converting each input variable into the
``cel.Context``), then one line per size:
``rules=N p50_us=X p99_us=Y decisions_per_s=Z ratio_to_one_cel=R`` (decisions_per_s from the
mean). Nothing outside this file is changed; ``--profile`` adds a cProfile of the 200-rule
decision.
"""

import gc
import itertools
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

import django

django.setup()

import cel  # noqa: E402
from django.db import connection  # noqa: E402

from approvals.policy.cel import compile_condition, evaluate  # noqa: E402
from approvals.policy.compiled import CompiledPolicy  # noqa: E402
from approvals.policy.decide import _cel_context, _grant_problem, decide, decide_on  # noqa: E402
from approvals.policy.risk import risk_score  # noqa: E402

SIZES = (10, 200, 2000)
SEED = 20261121
TOOLS = {  # family -> tools; the families with arguments have conditions on them
    "payments": ["payments.refund", "payments.charge", "payments.payout"],
    "email": ["email.send", "email.reply"],
    "orders": ["orders.lookup", "orders.cancel", "orders.update"],
    "travel": ["travel.search_hotels", "travel.book", "travel.cancel"],
    "infra": ["infra.diagnostics", "infra.run_migration", "infra.delete_volume", "infra.scale"],
    "crm": ["crm.lookup", "crm.update", "crm.merge", "crm.export"],
    "docs": ["docs.search", "docs.write", "docs.share"],
    "hr": ["hr.lookup", "hr.update_salary"],
    "github": ["github.open_pr", "github.merge", "github.delete_branch"],
    "slack": ["slack.post", "slack.invite"],
    "storage": ["storage.read", "storage.write", "storage.delete", "storage.share"],
}
WILDCARDS = ["payments.*", "email.*", "infra.*", "crm.*", "storage.*"]
AGENTS = ["refund-bot", "travel-agent", "infra-agent", "support-bot", "sales-bot", "ops-bot"]
GENERIC = [
    "risk.score > {n}",
    "agent.record.reject_rate > 0.{d}",
    "agent.record.error_rate > 0.{d} && risk.score > {n}",
    'run.cost_usd > {n}.5 || "secret" in run.labels',
    '"pii" in action.labels && tool.side_effect == "external_send"',
    "action.confidence >= 0.0 && action.confidence < 0.{d}",
    'run.workflow == "workflow_{n}"',
    "run.steps > {n}",
]
BY_FAMILY = {
    "payments": [
        "args.amount > {n}.0",
        "args.amount <= {n}.0 && risk.score < {n}",
        'args.amount > {n}.0 && agent.autonomy != "trusted"',
        'args.order_id.startsWith("B-{n}")',
    ],
    "email": [
        '"pii" in action.labels && !args.to.endsWith("@baton.example")',
        '"secret" in action.labels',
        'args.subject.contains("invoice {n}")',
        '!args.to.endsWith("@baton.example") && risk.score > {n}',
    ],
}
FACTORS = [
    {
        "name": "Refund above 500",
        "tool_patterns": ["payments.*"],
        "condition": "args.amount > 500.0",
        "points": 30,
        "enabled": True,
    },
    {
        "name": "Recipient outside the company",
        "tool_patterns": ["email.*"],
        "condition": '!args.to.endsWith("@baton.example")',
        "points": 20,
        "enabled": True,
    },
    {
        "name": "Bad record",
        "tool_patterns": [],
        "condition": "agent.record.reject_rate > 0.3",
        "points": 15,
        "enabled": True,
    },
]
TOOL_META = {
    "side_effect": "payment",
    "impact": 3,
    "reversible": False,
    "labels_read": ["financial"],
    "labels_produced": ["financial"],
}


def all_tools() -> list[str]:
    return [tool for tools in TOOLS.values() for tool in tools]


def snapshot(n: int) -> dict:
    """N rules over 39 patterns: 33 tools, 5 wildcards and every tool ([])."""
    rng = random.Random(SEED + n)
    patterns = [[t] for t in all_tools()] + [[w] for w in WILDCARDS] + [[]]
    rules = []
    for i in range(n):
        scope = patterns[i % len(patterns)]
        family = scope[0].split(".")[0] if scope else ""
        templates = BY_FAMILY.get(family, []) * 2 + GENERIC
        condition = rng.choice(templates).format(n=rng.randint(40, 2000), d=rng.randint(1, 9))
        rules.append(
            {
                "id": i + 1,
                "name": f"rule {i:04d}",
                "enabled": True,
                "mode": "shadow" if i % 10 == 9 else "enforce",
                "priority": rng.randint(1, 200),
                "agents": rng.sample(AGENTS, 2) if i % 4 == 3 else [],
                "workflows": [],
                "tool_patterns": scope,
                "condition": condition,
                "outcome": rng.choice(["allow", "ask", "ask", "deny"]),
                "obligations": {"team": "finance", "quorum": 1, "deadline_minutes": 60},
            }
        )
    thresholds = {"supervised": {"allow_below": 35, "deny_above": 90, "quorum2_above": 70}}
    tools = {tool: TOOL_META for tool in all_tools()}
    return {"rules": rules, "factors": FACTORS, "thresholds": thresholds, "tools": tools}


def prepared_input(tool: str = "payments.refund", run_id: int = 1) -> dict:
    """An evaluation input as ``build_context`` makes it (JSON: it is what is stored)."""
    args = {
        "payments.refund": {"order_id": "A-1004", "amount": 649.0, "reason": "It arrived broken."},
        "email.send": {"to": "dana@example.org", "subject": "Your refund", "body": "Dear Dana"},
    }.get(tool, {"id": "X-1"})
    return {
        "action": {
            "tool": tool,
            "args": args,
            "hash": "0" * 64,
            "labels": ["pii"],
            "reasoning": "The espresso machine arrived broken; the policy refunds in full.",
            "confidence": 0.8,
        },
        "args": args,
        "tool": {"name": tool, **TOOL_META},
        "agent": {
            "name": "refund-bot",
            "autonomy": "supervised",
            "status": "active",
            "record": {"actions": 412, "reject_rate": 0.05, "error_rate": 0.01},
        },
        "run": {
            "id": run_id,
            "workflow": "customer_refund",
            "intent": {"goal": "Refund a broken espresso machine", "constraints": []},
            "boundaries": ["!has(args.amount) || args.amount < 5000.0"],
            "labels": ["financial", "pii"],
            "cost_usd": 0.0123,
            "steps": 4,
        },
        "now": "2026-11-21T12:00:00+00:00",
    }


def timed(fn, iterations: int) -> list[float]:
    """Per-call times in microseconds, after a warm-up."""
    for _ in range(min(200, iterations)):
        fn()
    gc.collect()
    out = []
    clock = time.perf_counter_ns
    for _ in range(iterations):
        start = clock()
        fn()
        out.append((clock() - start) / 1000)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def one_cel(iterations: int) -> list[float]:
    program = cel.compile("args.amount > 500.0")
    ctx = _cel_context(prepared_input())
    return timed(lambda: program.execute(ctx), iterations)


def with_database(policy: CompiledPolicy, iterations: int) -> list[str]:
    """The grant check with 50 grants, and the full ``decide``, on a scratch database."""
    from approvals.policy.models import Grant
    from orchestration.gate import Action
    from orchestration.registry.models import Agent
    from orchestration.runs.models import Run

    old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True)
    try:
        agent = Agent.objects.create(name="refund-bot", autonomy="supervised")
        run = Run.objects.create(
            workflow="customer_refund",
            workflow_version=1,
            agent=agent,
            intent={"goal": "", "constraints": [], "boundaries": []},
            budgets={},
        )
        # 49 grants of other tools, all sorting before the one that matches (ordering is by
        # pattern), which has a condition: the worst case of the scan
        others = [t for t in all_tools() if t < "payments"] + ["crm.*", "email.*", "infra.*"]
        others += [f"archive{i:02d}.*" for i in range(49 - len(others))]
        Grant.objects.bulk_create(
            [Grant(agent=agent, tool_pattern=p) for p in others]
            + [Grant(agent=agent, tool_pattern="payments.*", condition="args.amount < 5000.0")]
        )
        assert Grant.objects.count() == 50
        data = prepared_input(run_id=run.pk)
        granted = timed(lambda: _grant_problem(data, run), iterations)
        assert _grant_problem(data, run) == ""
        denied_data = prepared_input("hr.update_salary", run_id=run.pk)
        denied = timed(lambda: _grant_problem(denied_data, run), iterations)
        action = Action(
            tool="payments.refund",
            args=data["args"],
            run_id=run.pk,
            step_seq=5,
            agent="refund-bot",
            reasoning=data["action"]["reasoning"],
            confidence=0.8,
        )
        run = Run.objects.select_related("agent").get(pk=run.pk)
        full = timed(lambda: decide(action, run, policy=policy), max(200, iterations // 5))
        queries = _count_queries(lambda: decide(action, run, policy=policy))
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)
    return [
        f"grant_check grants=50 granted_p50_us={pct(granted, 0.5):.1f} "
        f"granted_p99_us={pct(granted, 0.99):.1f} not_granted_p50_us={pct(denied, 0.5):.1f} "
        f"not_granted_p99_us={pct(denied, 0.99):.1f}",
        f"full_decide rules={len(policy.rules)} p50_us={pct(full, 0.5):.1f} "
        f"p99_us={pct(full, 0.99):.1f} queries={queries} (build_context + grants + decide_on)",
    ]


def _count_queries(fn) -> int:
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        fn()
    return len(captured)


def breakdown(policy: CompiledPolicy, data: dict, iterations: int) -> str:
    """Where a decision's time goes: the parts of ``decide_on`` timed one by one."""
    ctx = _cel_context(data)
    factors, score = risk_score(data, policy, ctx)
    risk = {"score": score, "factors": factors}
    rules = policy.rules_for(data["action"]["tool"])
    boundary = data["run"]["boundaries"][0]
    agent, workflow = data["agent"]["name"], data["run"]["workflow"]

    def evaluate_rules() -> None:
        for rule in rules:
            if rule.in_scope(agent=agent, workflow=workflow):
                evaluate(rule.program, ctx)

    parts = {
        "cel_context": lambda: _cel_context(data),
        "risk_score": lambda: risk_score(data, policy, ctx),
        "add_risk_variable": lambda: ctx.add_variable("risk", risk),
        "boundary": lambda: evaluate(compile_condition(boundary), ctx),
        "rules": evaluate_rules,
    }
    shown = " ".join(f"{k}_p50_us={pct(timed(fn, iterations), 0.5):.1f}" for k, fn in parts.items())
    sizes = " ".join(
        f"{k}={pct(timed(lambda v=v: cel.Context({'x': v}), iterations // 5), 0.5):.1f}"
        for k, v in {**data, "risk": risk}.items()
    )
    return (
        f"breakdown rules={len(policy.rules)} in_scope={len(rules)} {shown}\n"
        f"breakdown cel.Context conversion p50_us per variable: {sizes} "
        f"(risk has {len(factors)} factors)"
    )


def profile(policy: CompiledPolicy, data: dict) -> None:
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(5000):
        decide_on(data, policy)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(14)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    iterations = int(args[0]) if args else 5000
    data = prepared_input()
    mix = [
        prepared_input(t) for t in ("payments.refund", "email.send", "orders.lookup", "crm.update")
    ]

    cel_us = one_cel(iterations * 4)
    cel_p50 = pct(cel_us, 0.5)
    print(f"database={connection.vendor} iterations={iterations} cel={cel.__name__}")
    print(
        f"one_cel 'args.amount > 500.0' p50_us={cel_p50:.2f} p99_us={pct(cel_us, 0.99):.2f} "
        f"(cel.Program.execute on a cel.Context of the same input)"
    )
    policies, lines = {}, []
    for n in SIZES:
        start = time.perf_counter()
        policy = CompiledPolicy(1, snapshot(n))
        compile_ms = (time.perf_counter() - start) * 1000
        policies[n] = policy
        in_scope = len(policy.rules_for("payments.refund"))
        decisions = timed(lambda policy=policy: decide_on(data, policy), iterations)
        outcome = decide_on(data, policy)
        cycle = itertools.cycle(mix)
        mixed = timed(lambda p=policy, c=cycle: decide_on(next(c), p), iterations)
        print(
            f"context rules={n} compile_ms={compile_ms:.0f} refund_rules_in_scope={in_scope} "
            f"outcome={outcome.outcome} matched={len(outcome.rules)} "
            f"shadow={len(outcome.shadow_rules)} errors={len(outcome.errors)} "
            f"mix_of_4_tools_p50_us={pct(mixed, 0.5):.1f} mix_p99_us={pct(mixed, 0.99):.1f}"
        )
        p50 = pct(decisions, 0.5)
        lines.append(
            f"rules={n} p50_us={p50:.1f} p99_us={pct(decisions, 0.99):.1f} "
            f"decisions_per_s={1e6 / statistics.fmean(decisions):.0f} "
            f"ratio_to_one_cel={p50 / cel_p50:.1f}"
        )
    print(breakdown(policies[200], data, iterations))
    for line in with_database(policies[200], max(1000, iterations // 5)):
        print(line)
    for line in lines:
        print(line)
    if "--profile" in sys.argv:
        profile(policies[200], data)


if __name__ == "__main__":
    main()
