from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from orchestration.ledger.checkpoints import CheckpointError
from orchestration.ledger.models import LedgerError
from orchestration.ledger.retention import ledger_prune


class Command(BaseCommand):
    help = (
        "Delete audit records older than BATON_AUDIT_RETENTION_DAYS, after verifying them and "
        "writing a signed checkpoint of the last one deleted."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--days",
            type=int,
            default=None,
            help=f"retention in days (default BATON_AUDIT_RETENTION_DAYS, now "
            f"{settings.BATON_AUDIT_RETENTION_DAYS}; 0 keeps everything)",
        )

    def handle(self, *args, days: int | None = None, **options) -> None:
        try:
            result = ledger_prune(retention_days=days)
        except (LedgerError, CheckpointError) as exc:
            raise CommandError(str(exc)) from exc
        if not result.deleted:
            self.stdout.write("Nothing to prune.")
            return
        self.stdout.write(
            self.style.SUCCESS(
                f"Pruned {result.deleted} records below #{result.keep_from}; signed checkpoint "
                f"of #{result.checkpoint.seq} {result.checkpoint.hash[:16]} kept."
            )
        )
