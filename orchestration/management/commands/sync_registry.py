from django.core.management.base import BaseCommand

from orchestration.registry.declare import registry_sync


class Command(BaseCommand):
    help = "Write the tools declared in code to the database (admins' risk edits survive)."

    def handle(self, *args, **options) -> None:
        counts = registry_sync()
        self.stdout.write(
            f"Tools synced: {counts['created']} created, {counts['updated']} updated."
        )
