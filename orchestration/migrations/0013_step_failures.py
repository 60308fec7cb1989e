from django.db import migrations, models
from django.db.models import F


def count_past_failures(apps, schema_editor):
    """Steps that failed or wait for a retry: until now retries counted their attempts less
    those the database interrupted."""
    Step = apps.get_model("orchestration", "Step")
    Step.objects.filter(status__in=["retrying", "failed"]).update(
        failures=F("attempt") - F("interruptions")
    )


class Migration(migrations.Migration):
    dependencies = [
        ("orchestration", "0012_step_interruptions"),
    ]

    operations = [
        migrations.AddField(
            model_name="step",
            name="failures",
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.RunPython(count_past_failures, migrations.RunPython.noop),
        migrations.RemoveField(model_name="step", name="interruptions"),
    ]
