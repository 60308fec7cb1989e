"""The audit ledger becomes append-only in the database (PostgreSQL), and verification runs are
recorded.

The trigger refuses UPDATE, DELETE and TRUNCATE on the audit table. Two narrow exits are read
from settings local to the current transaction (``SET LOCAL``), so they end with it:

* ``baton.ledger_prune_below = '<seq>'``: DELETE of rows with ``seq`` below that boundary
  (``orchestration.ledger.retention.ledger_prune`` sets it after writing a checkpoint);
* ``baton.ledger_exit = 'test-teardown'``: DELETE and TRUNCATE, for the test database's flush
  between transactional tests (``tests/conftest.py``).

UPDATE has no exit at all. SQLite has no such triggers; there the ORM's guard is the only one.
"""

import django.utils.timezone
from django.db import migrations, models

GUARD_FUNCTION = "baton_ledger_guard"
ROW_TRIGGER = "baton_ledger_no_change"
TRUNCATE_TRIGGER = "baton_ledger_no_truncate"

CREATE_FUNCTION = f"""
CREATE OR REPLACE FUNCTION {GUARD_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ledger_exit text := coalesce(current_setting('baton.ledger_exit', true), '');
    prune_below text := coalesce(current_setting('baton.ledger_prune_below', true), '');
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        IF ledger_exit = 'test-teardown' THEN
            RETURN NULL;
        END IF;
    ELSIF TG_OP = 'DELETE' THEN
        IF ledger_exit = 'test-teardown' THEN
            RETURN OLD;
        END IF;
        IF prune_below <> '' THEN
            IF prune_below ~ '^[0-9]{{1,18}}$' THEN
                IF OLD.seq < prune_below::bigint THEN
                    RETURN OLD;
                END IF;
            END IF;
            RAISE EXCEPTION 'The audit ledger is append-only: record #% is not below the '
                'pruning boundary %', OLD.seq, prune_below
                USING ERRCODE = 'insufficient_privilege';
        END IF;
    END IF;
    RAISE EXCEPTION 'The audit ledger is append-only: % on % is refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
"""


def install_guard(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    table = schema_editor.quote_name(apps.get_model("orchestration", "AuditRecord")._meta.db_table)
    schema_editor.execute(CREATE_FUNCTION, params=None)  # "%" is plpgsql, not a placeholder
    schema_editor.execute(
        f"CREATE TRIGGER {ROW_TRIGGER} BEFORE UPDATE OR DELETE ON {table} "
        f"FOR EACH ROW EXECUTE FUNCTION {GUARD_FUNCTION}()"
    )
    schema_editor.execute(
        f"CREATE TRIGGER {TRUNCATE_TRIGGER} BEFORE TRUNCATE ON {table} "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {GUARD_FUNCTION}()"
    )


def remove_guard(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    table = schema_editor.quote_name(apps.get_model("orchestration", "AuditRecord")._meta.db_table)
    schema_editor.execute(f"DROP TRIGGER IF EXISTS {TRUNCATE_TRIGGER} ON {table}")
    schema_editor.execute(f"DROP TRIGGER IF EXISTS {ROW_TRIGGER} ON {table}")
    schema_editor.execute(f"DROP FUNCTION IF EXISTS {GUARD_FUNCTION}()")


class Migration(migrations.Migration):
    dependencies = [
        ("orchestration", "0007_audit_search_fields"),
    ]

    operations = [
        migrations.CreateModel(
            name="LedgerVerification",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                (
                    "at",
                    models.DateTimeField(db_index=True, default=django.utils.timezone.now),
                ),
                ("ok", models.BooleanField()),
                (
                    "source",
                    models.CharField(
                        choices=[("beat", "beat"), ("command", "command")], max_length=10
                    ),
                ),
                (
                    "checked",
                    models.PositiveBigIntegerField(default=0, help_text="records checked"),
                ),
                ("first_seq", models.PositiveBigIntegerField(blank=True, null=True)),
                ("last_seq", models.PositiveBigIntegerField(blank=True, null=True)),
                ("last_hash", models.CharField(blank=True, default="", max_length=64)),
                ("error", models.TextField(blank=True, default="")),
            ],
            options={
                "ordering": ["-at", "-id"],
            },
        ),
        migrations.RunPython(install_guard, remove_guard),
    ]
