from django.db import migrations, models
from django.db.models import OuterRef, Subquery


def backfill_team(apps, schema_editor):
    """Existing decisions were given under their request's team."""
    ApprovalRequest = apps.get_model("approvals", "ApprovalRequest")
    Decision = apps.get_model("approvals", "Decision")
    team = ApprovalRequest.objects.filter(pk=OuterRef("request_id")).values("team")[:1]
    Decision.objects.update(team=Subquery(team))


class Migration(migrations.Migration):
    dependencies = [
        ("approvals", "0005_request_edit_and_supersedes"),
    ]

    operations = [
        migrations.AddField(
            model_name="decision",
            name="team",
            field=models.CharField(
                blank=True,
                help_text="the request's team when the decision was given",
                max_length=80,
            ),
        ),
        migrations.RunPython(backfill_team, migrations.RunPython.noop),
    ]
