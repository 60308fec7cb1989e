import json
import time

from django.core.management.base import BaseCommand, CommandError

from orchestration.registry.declare import RegistryError
from orchestration.runs.models import Run
from orchestration.runs.services import RunError, run_start


class Command(BaseCommand):
    help = "Start a run of a workflow; --wait follows it to the end."

    def add_arguments(self, parser) -> None:
        parser.add_argument("workflow")
        parser.add_argument("--input", default="{}", help="the workflow's input as JSON")
        parser.add_argument("--agent", default=None, help="the agent's name")
        parser.add_argument("--goal", default="", help="the run's intent: its goal")
        parser.add_argument("--wait", action="store_true", help="wait until the run ends")

    def handle(self, *args, workflow: str, input: str, agent, goal: str, wait: bool, **options):
        try:
            data = json.loads(input)
        except json.JSONDecodeError as exc:
            raise CommandError(f"--input is not JSON: {exc}") from exc
        try:
            run = run_start(
                workflow=workflow, input=data, agent=agent, intent={"goal": goal}, started_by="cli"
            )
        except (RunError, RegistryError) as exc:
            messages = getattr(exc, "messages", [str(exc)])
            raise CommandError("; ".join(messages)) from exc
        self.stdout.write(f"Started run {run.pk} of {run.workflow} v{run.workflow_version}.")
        while wait:
            run = Run.objects.get(pk=run.pk)
            if run.is_final:
                outcome = json.dumps(run.result) if run.result is not None else run.error
                self.stdout.write(f"Run {run.pk} {run.status}: {outcome}")
                if run.status != "completed":
                    raise CommandError(f"run {run.pk} {run.status}")
                return
            time.sleep(0.5)
