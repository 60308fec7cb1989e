from django.core.management.base import BaseCommand, CommandError

from orchestration.ledger.chain import ledger_verify


class Command(BaseCommand):
    help = "Walk the audit ledger's hash chain; exit non-zero at the first broken link."

    def handle(self, *args, **options) -> None:
        result = ledger_verify()
        if not result.ok:
            raise CommandError(f"Ledger broken after {result.checked} good records: {result.error}")
        self.stdout.write(
            self.style.SUCCESS(
                f"Ledger intact: {result.checked} records, head #{result.last_seq} "
                f"{result.last_hash[:16]}"
            )
        )
