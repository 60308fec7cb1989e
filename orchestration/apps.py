from django.apps import AppConfig
from django.db.models.signals import post_migrate


class OrchestrationConfig(AppConfig):
    name = "orchestration"
    verbose_name = "Orchestration"

    def ready(self) -> None:
        # Declaring tools and workflows is importing the modules that hold them.
        import orchestration.demo.tools
        import orchestration.demo.workflows
        import orchestration.engine.builtin  # noqa: F401

        post_migrate.connect(_sync_registry, sender=self, dispatch_uid="orchestration.sync")


def _sync_registry(**kwargs) -> None:
    from orchestration.registry.declare import registry_sync

    registry_sync()
