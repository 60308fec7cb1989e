"""An index for the policy's totals of a tool over a time window (approvals.policy.aggregates)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("orchestration", "0009_audit_reason_search")]

    operations = [
        migrations.AddIndex(
            model_name="step",
            index=models.Index(fields=["name", "started_at"], name="step_name_started_idx"),
        ),
    ]
