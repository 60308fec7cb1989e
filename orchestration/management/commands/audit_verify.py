from django.core.management.base import BaseCommand, CommandError

from orchestration.ledger.verification import verify_ledger


class Command(BaseCommand):
    help = (
        "Walk the audit ledger's whole hash chain and check it against every signed checkpoint; "
        "record the run and exit non-zero at the first broken link, rewritten or cut chain, or "
        "altered checkpoint."
    )

    def handle(self, *args, **options) -> None:
        result = verify_ledger(source="command")
        if not result.ok:
            raise CommandError(f"Ledger broken after {result.checked} good records: {result.error}")
        first = result.first_seq or 1
        pruned = f", pruned below #{first}" if first > 1 else ""
        self.stdout.write(
            self.style.SUCCESS(
                f"Ledger intact: {result.checked} records, head #{result.last_seq} "
                f"{result.last_hash[:16]}, {result.checkpoints} signed checkpoints match{pruned}"
            )
        )
