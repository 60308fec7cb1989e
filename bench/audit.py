"""Ledger append throughput against plain inserts of the same rows, in one run.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/baton .venv/bin/python bench/audit.py [N]

Runs on a scratch test database (created and dropped here). Each append is its own transaction,
as in the product; the baseline inserts the same rows, one transaction each, without hashing or
locking the chain head. Prints absolute figures and `ratio` = append rate / plain insert rate.
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

from orchestration.ledger.chain import ledger_append  # noqa: E402
from orchestration.ledger.models import AuditRecord  # noqa: E402

PAYLOAD = {"tool": "payments.refund", "args": {"order_id": "A-1001", "amount": 120.5}}


def appends(n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        with transaction.atomic():
            ledger_append("bench.appended", payload={**PAYLOAD, "i": i}, run_id=i)
    return time.perf_counter() - start


def plain_inserts(n: int, offset: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        with transaction.atomic():
            AuditRecord.objects.create(
                seq=offset + i,
                at=timezone.now(),
                actor="system",
                verb="bench.inserted",
                run_id=i,
                payload='{"args":{"amount":120.5,"order_id":"A-1001"},"tool":"payments.refund"}',
                prev_hash="0" * 64,
                hash=f"{offset + i:064x}",
            )
    return time.perf_counter() - start


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True)
    try:
        appends(50)  # warm up connections and caches
        plain_inserts(50, offset=10_000_000)
        append_s = appends(n)
        plain_s = plain_inserts(n, offset=20_000_000)
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)
    print(f"database={connection.vendor} records={n}")
    print(
        f"append_per_s={n / append_s:.0f} plain_insert_per_s={n / plain_s:.0f} "
        f"ratio={plain_s / append_s:.2f}"
    )


if __name__ == "__main__":
    main()
