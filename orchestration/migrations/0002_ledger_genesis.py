from django.db import migrations


def create_head(apps, schema_editor):
    LedgerHead = apps.get_model("orchestration", "LedgerHead")
    LedgerHead.objects.get_or_create(pk=1)


class Migration(migrations.Migration):
    dependencies = [("orchestration", "0001_initial")]

    operations = [migrations.RunPython(create_head, migrations.RunPython.noop)]
