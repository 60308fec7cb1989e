"""Ledger append throughput against plain inserts of the same rows, in one run.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/baton .venv/bin/python bench/audit.py [N] [M]

N appends (default 2000), then the auditor search benchmark of ``bench/audit_search.py`` over M
records (default 1,000,000; 0 skips it; it loads them in about three minutes).

Runs on a scratch test database (created and dropped here). Each append is its own transaction,
as in the product; the baseline inserts the same rows, one transaction each, with the same
INSERT statement but without hashing or locking and advancing the chain head. The two sides run
in interleaved rounds. Prints absolute figures and `ratio` = append rate / plain insert rate.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

import django

django.setup()

from django.db import connection, transaction  # noqa: E402
from django.utils import timezone  # noqa: E402

from orchestration.canonical import canonical_json  # noqa: E402
from orchestration.ledger.chain import INSERT_COLUMNS, ledger_append  # noqa: E402
from orchestration.ledger.models import GENESIS_HASH, AuditRecord  # noqa: E402

PAYLOAD = {"tool": "payments.refund", "args": {"order_id": "A-1001", "amount": 120.5}}
ROUNDS = 10


def appends(n: int, start: int = 0) -> float:
    """``n`` ledger appends, each in its own transaction, as the product writes them."""
    begin = time.perf_counter()
    for i in range(start, start + n):
        with transaction.atomic():
            ledger_append("bench.appended", payload={**PAYLOAD, "i": i}, run_id=i, actor="system")
    return time.perf_counter() - begin


def plain_inserts(n: int, start: int, offset: int) -> float:
    """The same rows (same columns and values, payload made canonical the same way), each in its
    own transaction, by the ledger's own INSERT statement: no hashing, no head lock or update."""
    columns = ", ".join(INSERT_COLUMNS)
    placeholders = ", ".join(["%s"] * len(INSERT_COLUMNS))
    sql = f"INSERT INTO {AuditRecord._meta.db_table} ({columns}) VALUES ({placeholders})"  # noqa: S608
    begin = time.perf_counter()
    for i in range(start, start + n):
        with transaction.atomic(), connection.cursor() as cursor:
            row = {
                "seq": offset + i,
                "at": connection.ops.adapt_datetimefield_value(timezone.now()),
                "actor": "system",
                "actor_user_id": None,
                "verb": "bench.appended",
                "run_id": i,
                "agent_id": None,
                "approval_id": None,
                "user_id": None,
                "object_type": "",
                "object_id": "",
                "workflow": "",
                "tool": "",
                "outcome": "",
                "risk": None,
                "reason": "",
                "payload": canonical_json({**PAYLOAD, "i": i}),
                "prev_hash": GENESIS_HASH,
                "hash": f"{offset + i:064x}",
            }
            cursor.execute(sql, [row[column] for column in INSERT_COLUMNS])
    return time.perf_counter() - begin


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    search_records = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
    old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True)
    try:
        appends(50)  # warm up connections and caches
        plain_inserts(50, 0, offset=10_000_000)
        # Interleaved rounds, alternating which side goes first, so that load from elsewhere on
        # the machine falls on both sides alike.
        append_s = plain_s = 0.0
        per_round = max(n // ROUNDS, 1)
        for r in range(ROUNDS):
            start = 50 + r * per_round
            if r % 2:
                plain_s += plain_inserts(per_round, start, offset=20_000_000)
                append_s += appends(per_round, start)
            else:
                append_s += appends(per_round, start)
                plain_s += plain_inserts(per_round, start, offset=20_000_000)
        n = per_round * ROUNDS
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)
    print(f"database={connection.vendor} records={n}")
    print(
        f"append_per_s={n / append_s:.0f} plain_insert_per_s={n / plain_s:.0f} "
        f"ratio={plain_s / append_s:.2f}"
    )
    if search_records:
        from bench.audit_search import search_bench

        search_bench(search_records)


if __name__ == "__main__":
    main()
