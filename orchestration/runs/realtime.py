"""Run broadcasts: ids only, after commit; consumers re-read under the viewer's permissions."""

from orchestration.broadcast import broadcast

RUNS_GROUP = "runs"


def run_group(run_id: int) -> str:
    return f"runs.{run_id}"


def broadcast_run(run_id: int) -> None:
    broadcast(run_group(run_id), "run.changed", run_id=run_id)
    broadcast(RUNS_GROUP, "run.changed", run_id=run_id)
