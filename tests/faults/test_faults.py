"""The fault suite: runs that need a reviewer's approval, a durable sleep and a step longer than
the lease, advanced by three real workers (solo pool) and beat, on PostgreSQL
and a private Redis, while the suite SIGKILLs workers (at random, and exactly inside the claim,
suspend and executed-but-unrecorded windows through the engine's fault points), kills Redis and
restarts it empty, and terminates every PostgreSQL backend during traffic. A reviewer approves
requests through the product's own service throughout.

It asserts 0 lost, 0 duplicated, 0 stuck and 0 half-written runs (``harness`` defines them),
that runs started after a database drop complete, and that every run is final within
``RECOVERY_SECONDS`` of the last fault. It prints ``key=value`` figures.

CI-sized inside ``make test`` (one round of every fault over ``BATON_FAULTS_RUNS`` runs, default
12, and the runs started after the faults); ``make faults`` runs ``BATON_FAULTS_ROUNDS`` rounds.
"""

import os
import random
import time
import uuid
from contextlib import suppress

import pytest
from django.utils import timezone

from approvals.policy.models import Rule
from approvals.policy.services import policy_publish
from orchestration.engine import faults
from orchestration.registry.declare import registry_sync
from orchestration.runs.models import FINAL, Run, Step
from orchestration.runs.services import run_start
from tests.approvals.conftest import member
from tests.faults.harness import PrivateRedis, Reviewer, classify, terminate_backends
from tests.faults.workflows import JOURNAL_ENV, PLAN_ENV
from tests.services import Workers, producer_on, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

RUNS = int(os.environ.get("BATON_FAULTS_RUNS", "12"))  # per round
ROUNDS = int(os.environ.get("BATON_FAULTS_ROUNDS", "1"))
LEASE_SECONDS = 3
RECOVERY_SECONDS = 60  # every run is final this long after the last fault, at the latest
GATE = "approvals.policy.gate.PolicyGate"
SLOTS = ["a", "b", "c"]  # three workers: two long steps at once still leave one free


def policy_for_the_suite() -> None:
    """Ask a reviewer of ``ops`` for every effect whose target ends in ``/approve``; allow the
    others."""
    registry_sync()
    ask = 'args.target.endsWith("/approve")'
    Rule.objects.create(
        name="Approve", tool_patterns=["faults.effect"], outcome="ask", team="ops", condition=ask
    )
    Rule.objects.create(
        name="Allow", tool_patterns=["faults.effect"], outcome="allow", condition=f"!({ask})"
    )
    policy_publish(by="fault-suite")


def targets(run: Run) -> list[str]:
    tag = run.input["tag"]
    return [f"{tag}/a", f"{tag}/approve", f"{tag}/c"]


def test_no_run_is_lost_duplicated_stuck_or_half_written_under_faults(settings, tmp_path):
    settings.BATON_GATE = GATE
    policy_for_the_suite()
    reviewer = member("fault-reviewer", "ops")
    redis = PrivateRedis(tmp_path)
    plan, journal = tmp_path / "plan", tmp_path / "journal"
    env = {
        "BATON_GATE": GATE,
        "BATON_LEASE_SECONDS": str(LEASE_SECONDS),
        PLAN_ENV: str(plan),
        JOURNAL_ENV: str(journal),
    }
    workers = Workers(redis.url, tmp_path, include=["tests.faults.workflows"], env=env)
    prefix = f"f{uuid.uuid4().hex[:6]}"
    run_ids: list[int] = []
    fired: dict[str, bool] = {}
    dropped = {"backends": 0}
    figures: dict[str, float] = {}
    redis.start()
    reviewer_thread = Reviewer(reviewer, lambda: list(run_ids))
    try:
        with producer_on(redis.url):
            workers.start_beat()
            for slot in SLOTS:
                workers.start(slot)
            reviewer_thread.start()
            began = time.monotonic()

            def start_runs(count: int, *, long: int = 0) -> list[int]:
                started = []
                for i in range(count):
                    tag = f"{prefix}-{len(run_ids):03}"
                    run_input = {"tag": tag, "long": i < long}
                    started.append(run_start(workflow="faults.mixed", input=run_input).pk)
                    run_ids.append(started[-1])
                return started

            def recovered(figure: str, since, runs: list[int]) -> None:
                """Wait until each of ``runs`` recorded a step finished after ``since`` (or
                ended); keep the longest wait per kind of fault."""
                clock = time.monotonic()

                def progressed() -> bool:
                    moved = set(
                        Step.objects.filter(
                            run_id__in=runs, status="completed", finished_at__gt=since
                        ).values_list("run_id", flat=True)
                    )
                    moved |= set(
                        Run.objects.filter(pk__in=runs, status__in=FINAL).values_list(
                            "pk", flat=True
                        )
                    )
                    return moved >= set(runs)

                with suppress(AssertionError):  # not recovering is counted by the oracle
                    wait_for(progressed, timeout=RECOVERY_SECONDS, what=figure)
                took = round(time.monotonic() - clock, 1)
                figures[figure] = max(figures.get(figure, 0), took)

            def kill_at(point: str) -> None:
                """Plan a SIGKILL at ``point``; wait until a worker took it and died there;
                restart it; measure how long the run it held took to move on."""
                plan.write_text(point)
                start_runs(2)  # work that reaches the point, whatever the others are doing
                dead = wait_for(workers.dead, timeout=30, what=f"a worker to die at {point}")
                since = timezone.now()
                assert not plan.exists()
                (taken,) = tmp_path.glob("plan.taken-*")
                run_id = int(taken.read_text().split()[1])
                taken.unlink()
                for slot in dead:
                    workers.restart(slot)
                fired[point] = True
                recovered(f"recovery_kill_{point}_s", since, [run_id])

            after_drop = 0
            for _ in range(ROUNDS):
                start_runs(RUNS, long=2)
                kill_at(faults.CLAIMED)
                kill_at(faults.FINISHING)
                kill_at(faults.EXECUTED)

                time.sleep(random.uniform(0.2, 1.0))  # a random moment
                workers.restart(random.choice(SLOTS))  # SIGKILL wherever it is

                # Redis dies: runs started meanwhile lose their message; back empty.
                redis.kill()
                during = start_runs(RUNS // 3)
                redis.restart_empty()
                recovered("recovery_redis_s", timezone.now(), during)

                # Every PostgreSQL backend is terminated during traffic.
                since = timezone.now()
                dropped["backends"] += terminate_backends()
                live = Run.objects.filter(pk__in=run_ids).exclude(status__in=FINAL)
                busy = list(live.filter(input__long=False)[:5])  # a long step takes 7 s anyway
                recovered("recovery_postgres_s", since, [run.pk for run in busy])
                after_drop += RUNS // 3
                start_runs(RUNS // 3)  # runs started after a drop complete
            last_fault = time.monotonic()

            def all_final() -> bool:
                return not Run.objects.filter(pk__in=run_ids).exclude(status__in=FINAL).exists()

            with suppress(AssertionError):  # the oracle counts them as stuck, with the rest
                wait_for(all_final, timeout=RECOVERY_SECONDS, what="every run to be final")
            figures["final_after_last_fault_s"] = round(time.monotonic() - last_fault, 1)
            figures["total_s"] = round(time.monotonic() - began, 1)
    finally:
        reviewer_thread.stop()
        workers.stop_all()
        redis.stop()

    verdict = classify(run_ids, targets=targets, journal=journal, deaths=workers.deaths)
    kills = len(workers.logs_paths) - 1 - len(SLOTS)  # the rest were restarts
    print(
        f"\n{verdict.line()} worker_kills={kills} redis_restarts={redis.restarts} "
        f"backends_terminated={dropped['backends']} runs_after_drop={after_drop} "
        + " ".join(f"{k}={v}" for k, v in figures.items())
    )
    if not verdict.clean:
        print(workers.logs())
        print("deaths", workers.deaths)
    assert verdict.clean, verdict
    assert set(fired) >= {faults.CLAIMED, faults.FINISHING, faults.EXECUTED}
    assert dropped["backends"] > 0
    assert len(reviewer_thread.approved) >= len(run_ids)  # every run asked once, was approved
    assert figures["final_after_last_fault_s"] < RECOVERY_SECONDS
