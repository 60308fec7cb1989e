import itertools
import random
import time

from django.core.management.base import BaseCommand, CommandError

from orchestration.demo.seed import ORDERS
from orchestration.runs.services import run_start

REASONS = [
    "The item arrived broken.",
    "It stopped working after two days.",
    "Wrong colour delivered, please refund.",
    "Package never arrived.",
]
REQUESTS = [
    "a quiet beach hotel near Lisbon, first week of October, under 200 a night",
    "a beach hotel near Lisbon, second week of June, under 250 a night",
    "something quiet near Lisbon in May, under 180 a night",
]


def _traffic(rng: random.Random):
    for n in itertools.count(1):
        kind = n % 3
        if kind == 1:
            order = rng.choice(ORDERS)
            yield (
                "customer_refund",
                "refund-bot",
                {"order_id": order[0], "reason": rng.choice(REASONS)},
            )
        elif kind == 2:
            yield (
                "travel_booking",
                "travel-agent",
                {"request": rng.choice(REQUESTS), "guest": rng.choice(["Ana", "Bo", "Chen"])},
            )
        else:
            yield (
                "infra_change",
                None,
                {
                    "goal": "Disk is filling up on billing; investigate.",
                    "service": "billing",
                    "volume": "vol-" + str(n),
                },
            )


class Command(BaseCommand):
    help = "Keep starting demo runs: --rate N runs per minute, until Ctrl-C (or --count)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--rate", type=float, default=6.0, help="runs per minute")
        parser.add_argument("--count", type=int, default=0, help="stop after this many runs")
        parser.add_argument("--seed", type=int, default=None)

    def handle(self, *args, rate: float, count: int, seed, **options) -> None:
        if rate <= 0:
            raise CommandError("--rate must be above 0 runs per minute.")
        rng = random.Random(seed)  # noqa: S311 - demo data
        for started, (workflow, agent, data) in enumerate(_traffic(rng), start=1):
            run = run_start(workflow=workflow, input=data, agent=agent, started_by="demo-traffic")
            self.stdout.write(f"run {run.pk}: {workflow}")
            if count and started >= count:
                return
            time.sleep(60.0 / rate)
