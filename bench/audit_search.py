"""The auditors' search on a large ledger: p95 of the first page of three typical filters.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/baton_b \\
        .venv/bin/python bench/audit_search.py [N]

PostgreSQL only (the search's full-text index exists there). A scratch database is created
(``test_<name>_search``) with the project's migrations, and dropped at the end; nothing else is
touched. ``bench/audit.py``'s ``main()`` may call ``search_bench()`` too.

N records (default 1,000,000) are bulk-loaded in one ``INSERT ... SELECT`` over
``generate_series``: six months of ledger, newest last, with the mix of a busy deployment (gate
verdicts, approval requests and decisions by 40 reviewers, claims, runs, logins) over 25 agents,
12 workflows and 40 tools, risk scores on the gate's and the queue's records, and reasons drawn
from 5,000 sentences (the gate's rule and threshold wording, reviewers' comments from a 400-word
vocabulary with a skewed word frequency). The records do **not** form a valid hash chain (``hash``
and ``prev_hash`` are filler): the search never reads the chain, and computing one would make the
load a hundred times slower. The table is analysed after the load, as autovacuum would.

Each filter runs through the real builder (``approvals.audit.search``: the form, then
``audit_page``, the first page of 50 newest first) 60 times with varied values (reviewers, words,
windows), after 5 warm-up runs; the database is warm (a deployment's is). Prints the load time,
the table's size, then one line per filter with its absolute figures and ``search_p95_ms=...``.
Target: p95 < 200 ms at 1,000,000 records.
"""

import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

import django

django.setup()

from django.db import connection  # noqa: E402
from django.utils import timezone  # noqa: E402

from approvals.audit.search import audit_page, parse_filters  # noqa: E402
from orchestration.ledger.models import AuditRecord, LedgerHead  # noqa: E402

SEED = 20261121
RUNS, WARMUP = 60, 5
DAYS = 182
REVIEWERS = [f"reviewer{i:02d}" for i in range(40)]
AGENTS = [f"agent-{i:02d}" for i in range(25)]
WORKFLOWS = [
    "customer_refund", "travel_booking", "infra_change", "invoice_dispute", "newsletter",
    "account_closure", "kyc_review", "price_update", "support_reply", "data_export",
    "vendor_payment", "access_request",
]  # fmt: skip
TOOLS = [
    f"{family}.{action}"
    for family, actions in {
        "payments": ["refund", "charge", "payout", "void"],
        "email": ["send", "draft"],
        "orders": ["lookup", "cancel", "update"],
        "crm": ["lookup", "update", "merge", "delete"],
        "infra": ["run_migration", "restart", "scale", "rollback"],
        "travel": ["search", "book", "cancel"],
        "files": ["read", "write", "share", "delete"],
        "kyc": ["check", "approve", "reject"],
        "tickets": ["reply", "close", "escalate"],
        "billing": ["credit", "adjust", "invoice"],
        "users": ["invite", "disable", "grant"],
        "reports": ["export", "schedule"],
    }.items()
    for action in actions
][:40]
RULES = [
    "Large refunds need finance", "Small refunds within policy",
    "Customer data leaving the company", "Production changes need operations",
    "No payouts to new vendors", "Bulk email needs review",
    "Deletions need two reviewers", "Travel over budget", "KYC rejections need compliance",
    "Credit notes over 1000", "Access to admin groups", "Exports of personal data",
]  # fmt: skip
# (verb, share, actor kind, outcome, has risk)
MIX = [
    ("policy.allow", 40, "gate", "allow", True),
    ("policy.ask", 10, "gate", "ask", True),
    ("policy.deny", 4, "gate", "deny", True),
    ("approval.created", 9, "gate", "opened", True),
    ("approval.claimed", 6, "reviewer", "claimed", True),
    ("approval.decided", 8, "reviewer", "", True),
    ("approval.expired", 1, "system", "expired", True),
    ("run.created", 5, "system", "created", False),
    ("run.started", 5, "engine", "started", False),
    ("run.completed", 4, "engine", "completed", False),
    ("run.failed", 1, "engine", "failed", False),
    ("account.login", 4, "reviewer", "", False),
    ("grant.used", 2, "gate", "allow", True),
    ("policy.draft_changed", 1, "admin", "", False),
]
VERDICTS = ["approve"] * 12 + ["edit"] * 3 + ["reject"] * 4 + ["halt"]


def _vocabulary(rng: random.Random) -> list[str]:
    base = (  # noqa: SIM905  (a sentence reads better than 100 quoted words)
        "customer refund order invoice duplicate charge chargeback fraud shipping damaged broken "
        "cracked screen blender laptop delivery late missing package return warehouse policy limit "
        "amount exceeds approved manager finance operations compliance vendor payout account "
        "closure request personal data export gdpr consent email newsletter bulk recipients "
        "outside domain migration production database backup rollback outage incident access "
        "admin group privilege token travel budget flight hotel booking cancel price discount "
        "coupon credit note balance overdue reminder ticket escalation support reply agent "
        "reasoning confidence unclear wrong twice again already paid verified checked confirmed "
        "rejected approved edited halted because the and of for with not only after before"
    ).split()
    extra = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 9)))
        for _ in range(400 - len(base))
    ]
    return base + extra


def _reasons(rng: random.Random, words: list[str], count: int = 5000) -> list[str]:
    """What the gate and the reviewers write: rule and threshold wording, and comments whose
    words follow a skewed (Zipf-like) frequency."""
    weights = [1 / (rank + 1) for rank in range(len(words))]
    reasons = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            reasons.append(f"rule {rng.choice(RULES)}")
        elif kind == 1:
            score = rng.randint(0, 100)
            reasons.append(
                rng.choice(
                    [
                        f"risk {score} is below supervised's allow threshold",
                        f"risk {score} needs a reviewer at supervised autonomy",
                        f"risk {score} is above autonomous's deny threshold",
                    ]
                )
            )
        else:
            length = rng.randint(5, 16)
            reasons.append(" ".join(rng.choices(words, weights=weights, k=length)).capitalize())
    return reasons


def h(salt: int, of: str = "g") -> str:
    """SQL for a pseudo-random non-negative integer of ``of`` (independent for each salt)."""
    return f"(hashint4(({of}) * 8 + {salt}) & 2147483647)"


def load(n: int, rng: random.Random) -> tuple[float, dict]:
    """Bulk-load ``n`` records with one INSERT ... SELECT; returns seconds and the vocabulary."""
    words = _vocabulary(rng)
    reasons = _reasons(rng, words)
    table = AuditRecord._meta.db_table
    verbs = [m[0] for m in MIX for _ in range(m[1])]  # 100 slots
    start = time.perf_counter()
    with connection.cursor() as cursor:
        # Filler, not a chain: past the ledger's triggers (migration 0011), as a superuser may.
        cursor.execute("SET session_replication_role = replica")
        cursor.execute("CREATE TEMP TABLE bench_reason (id int PRIMARY KEY, text text)")
        cursor.executemany("INSERT INTO bench_reason VALUES (%s, %s)", list(enumerate(reasons)))
        cursor.execute(
            "CREATE TEMP TABLE bench_verb AS SELECT ord - 1 AS slot, verb FROM "
            "unnest(%s::text[]) WITH ORDINALITY AS v(verb, ord)",
            [verbs],
        )
        kinds = {m[0]: m for m in MIX}
        actor_sql = (
            "CASE v.verb "
            + " ".join(
                f"WHEN '{verb}' THEN "
                + {
                    "gate": "'policy-gate'",
                    "system": "'system'",
                    "engine": "'engine'",
                    "admin": "'policy'",
                    "reviewer": f"'reviewer' || lpad(({h(11)} %% {len(REVIEWERS)})::text, 2, '0')",
                }[kinds[verb][2]]
                for verb in kinds
            )
            + " END"
        )
        outcome_sql = (
            "CASE v.verb "
            + " ".join(f"WHEN '{verb}' THEN '{m[3]}'" for verb, m in kinds.items() if m[3])
            + (
                f" WHEN 'approval.decided' THEN (%s::text[])[1 + {h(13)} %% "
                f"{len(VERDICTS)}] ELSE '' END"
            )
        )
        risky = ", ".join(f"'{verb}'" for verb, m in kinds.items() if m[4])
        about = "v.verb NOT LIKE 'account.%%' AND v.verb NOT LIKE 'policy.draft%%'"
        span = DAYS * 86400.0 / n
        cursor.execute(
            f"""
            INSERT INTO {table} (seq, at, actor, actor_user_id, verb, run_id, agent_id,
                approval_id, user_id, object_type, object_id, workflow, tool, outcome, risk,
                reason, payload, prev_hash, hash)
            SELECT g,
                now() - make_interval(secs => (%s - g) * %s),
                {actor_sql},
                NULL,
                v.verb,
                CASE WHEN {about} THEN g / 12 END,
                CASE WHEN {about} THEN 1 + {h(5, "g / 12")} %% {len(AGENTS)} END,
                CASE WHEN v.verb LIKE 'approval.%%' THEN g / 3 END,
                NULL,
                CASE WHEN v.verb LIKE 'policy.%%' AND v.verb <> 'policy.draft_changed'
                    THEN 'step' ELSE '' END,
                CASE WHEN v.verb LIKE 'policy.%%' AND v.verb <> 'policy.draft_changed'
                    THEN (1 + {h(23)} %% 9)::text ELSE '' END,
                CASE WHEN {about} THEN (%s::text[])[1 + {h(3, "g / 12")} %% {len(WORKFLOWS)}]
                    ELSE '' END,
                CASE WHEN v.verb LIKE 'policy.%%' OR v.verb LIKE 'approval.%%'
                    OR v.verb = 'grant.used'
                    THEN (%s::text[])[1 + {h(7)} %% {len(TOOLS)}] ELSE '' END,
                {outcome_sql},
                CASE WHEN v.verb IN ({risky}) THEN ({h(17)} %% 101)::smallint END,
                CASE WHEN v.verb LIKE 'policy.%%' OR v.verb LIKE 'approval.%%'
                    OR v.verb LIKE 'run.failed' THEN r.text ELSE '' END,
                '{{"bench":true,"i":' || g || '}}',
                md5(g::text) || md5((g - 1)::text),
                md5(g::text || 'h') || md5(g::text || 'i')
            FROM generate_series(1, %s) AS g
            JOIN bench_verb v ON v.slot = {h(0)} %% {len(verbs)}
            JOIN bench_reason r ON r.id = {h(19)} %% {len(reasons)}
            """,  # noqa: S608  (this file's constants only; the values are parameters)
            [n, span, WORKFLOWS, TOOLS, VERDICTS, n],
        )
        cursor.execute(f"ANALYZE {table}")
    LedgerHead.objects.update_or_create(pk=1, defaults={"seq": n, "hash": "f" * 64})
    with connection.cursor() as cursor:
        cursor.execute("SET session_replication_role = origin")
    return time.perf_counter() - start, {"words": words}


def _filters(rng: random.Random, words: list[str]) -> dict[str, Callable[[], dict]]:
    now = timezone.now()
    mid = words[10:60]  # words of middling frequency: thousands of matches each

    def iso(days: float) -> str:
        return (now - timedelta(days=days)).replace(microsecond=0).isoformat()

    def week(params: dict) -> dict:
        back = rng.uniform(7, DAYS - 7)
        return {**params, "from": iso(back), "to": iso(back - 7)}

    return {
        # A compliance question: high-risk payments the gate denied in a week of the past
        "denied_high_risk_payments_in_a_past_week": lambda: week(
            {
                "tool": rng.choice(["payments.refund", "payments.payout", "billing.credit"]),
                "outcome": "deny",
                "risk": "high",
            }
        ),
        # One reviewer's decisions
        "reviewer_decisions": lambda: {
            "actor": rng.choice(REVIEWERS),
            "verb": "approval.decided",
        },
        # Words in reasons, in one workflow, over the last quarter
        "reason_text_in_workflow_90d": lambda: {
            "q": " ".join(rng.sample(mid, rng.choice([1, 1, 2]))),
            "workflow": rng.choice(WORKFLOWS),
            "from": iso(90),
        },
    }


def _time(params: dict) -> tuple[float, int]:
    start = time.perf_counter()
    filters, form = parse_filters(params)
    assert filters is not None, form.errors
    page = audit_page(filters)
    return (time.perf_counter() - start) * 1000, len(page.records)


def search_bench(records: int = 1_000_000) -> None:
    """Create a scratch PostgreSQL database, load ``records`` records, print the p95 of the
    first page of three typical auditor filters (``search_p95_ms=...``), drop the database."""
    if connection.vendor != "postgresql":
        print("search_bench: skipped, it needs PostgreSQL (set DATABASE_URL=postgres://...)")
        return
    rng = random.Random(SEED)
    test_settings = connection.settings_dict.setdefault("TEST", {})
    previous_test_name = test_settings.get("NAME")
    test_settings["NAME"] = f"test_{connection.settings_dict['NAME']}_search"
    old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    try:
        seconds, vocabulary = load(records, rng)
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_size_pretty(pg_total_relation_size(%s)), "
                "pg_size_pretty(pg_relation_size('audit_reason_tsv_idx'))",
                [AuditRecord._meta.db_table],
            )
            total, text_index = cursor.fetchone()
        print(
            f"database=postgresql records={records} load_s={seconds:.1f} "
            f"table_with_indexes={total} reason_gin_index={text_index}"
        )
        for name, make in _filters(rng, vocabulary["words"]).items():
            for _ in range(WARMUP):
                _time(make())
            timings, rows = [], []
            for _ in range(RUNS):
                ms, count = _time(make())
                timings.append(ms)
                rows.append(count)
            timings.sort()
            p95 = timings[int(len(timings) * 0.95) - 1]
            print(
                f"filter={name} runs={RUNS} rows_per_page_median={statistics.median(rows):.0f} "
                f"p50_ms={statistics.median(timings):.1f} max_ms={timings[-1]:.1f} "
                f"search_p95_ms={p95:.1f}"
            )
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)
        if previous_test_name is None:
            test_settings.pop("NAME", None)
        else:
            test_settings["NAME"] = previous_test_name


if __name__ == "__main__":
    search_bench(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
