"""Full-text search over the reasons of audit records (PostgreSQL).

A GIN index on ``to_tsvector('simple'::regconfig, reason)``: the auditors' search
(``approvals.audit.search``) queries exactly this expression, so PostgreSQL uses the index. The
``simple`` configuration lower-cases words without stemming or stop words: reasons are short and
mix languages, rule names and identifiers. SQLite has no such index; the search falls back to
``icontains`` there.

The index is built ``CONCURRENTLY`` (hence a non-atomic migration), so that appends to a large
ledger are not blocked while it builds.
"""

from django.db import migrations


class PostgreSQLOnly(migrations.RunSQL):
    """RunSQL that runs on PostgreSQL and does nothing elsewhere (``sqlmigrate`` shows it)."""

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            super().database_forwards(app_label, schema_editor, from_state, to_state)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            super().database_backwards(app_label, schema_editor, from_state, to_state)


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run inside a transaction

    dependencies = [
        ("orchestration", "0008_ledger_append_only"),
    ]

    operations = [
        PostgreSQLOnly(
            sql="CREATE INDEX CONCURRENTLY IF NOT EXISTS audit_reason_tsv_idx "
            "ON orchestration_auditrecord USING gin (to_tsvector('simple'::regconfig, reason))",
            reverse_sql="DROP INDEX CONCURRENTLY IF EXISTS audit_reason_tsv_idx",
            elidable=False,
        ),
    ]
