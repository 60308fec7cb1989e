from django.db import migrations, models
from django.db.models import F


def count_past_failures(apps, schema_editor):
    """Steps that already failed or wait for a retry: each of their attempts counted, until now."""
    Step = apps.get_model("orchestration", "Step")
    Step.objects.filter(status__in=["retrying", "failed"]).update(failures=F("attempt"))


class Migration(migrations.Migration):
    dependencies = [
        ("orchestration", "0011_ledger_linked_appends"),
    ]

    operations = [
        migrations.AddField(
            model_name="step",
            name="failures",
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.RunPython(count_past_failures, migrations.RunPython.noop),
    ]
