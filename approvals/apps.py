from django.apps import AppConfig
from django.db.models.signals import post_migrate


class ApprovalsConfig(AppConfig):
    name = "approvals"
    verbose_name = "Approvals"

    def ready(self) -> None:
        from approvals import accounts
        from approvals.roles import ensure_roles

        post_migrate.connect(ensure_roles, sender=self, dispatch_uid="approvals.ensure_roles")
        accounts.connect_signals()
