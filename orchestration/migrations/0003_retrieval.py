"""The document store (orchestration.retrieval) and its full-text index, per database vendor.

PostgreSQL: a GIN index on the expression ``to_tsvector('english', text)``, which
``orchestration.retrieval.search`` repeats exactly so the planner uses it.
SQLite: an FTS5 external-content table over ``orchestration_chunk``, kept in sync by triggers.
Django rebuilds an SQLite table (dropping its triggers) for most later field alterations, so a
migration that alters Chunk must run ``search_index_drop`` then ``search_index_create`` again.
"""

import django.db.models.deletion
import django.utils.timezone
from django.db import migrations, models

POSTGRES_CREATE = [
    "CREATE INDEX orchestration_chunk_text_fts ON orchestration_chunk"
    " USING GIN (to_tsvector('english', text))",
]
POSTGRES_DROP = ["DROP INDEX IF EXISTS orchestration_chunk_text_fts"]

SQLITE_CREATE = [
    "CREATE VIRTUAL TABLE orchestration_chunk_fts USING fts5("
    "text, content='orchestration_chunk', content_rowid='id', tokenize='porter unicode61')",
    "CREATE TRIGGER orchestration_chunk_fts_ai AFTER INSERT ON orchestration_chunk BEGIN"
    " INSERT INTO orchestration_chunk_fts(rowid, text) VALUES (new.id, new.text);"
    " END",
    "CREATE TRIGGER orchestration_chunk_fts_ad AFTER DELETE ON orchestration_chunk BEGIN"
    " INSERT INTO orchestration_chunk_fts(orchestration_chunk_fts, rowid, text)"
    " VALUES ('delete', old.id, old.text);"
    " END",
    "CREATE TRIGGER orchestration_chunk_fts_au AFTER UPDATE ON orchestration_chunk BEGIN"
    " INSERT INTO orchestration_chunk_fts(orchestration_chunk_fts, rowid, text)"
    " VALUES ('delete', old.id, old.text);"
    " INSERT INTO orchestration_chunk_fts(rowid, text) VALUES (new.id, new.text);"
    " END",
    "INSERT INTO orchestration_chunk_fts(orchestration_chunk_fts) VALUES ('rebuild')",
]
SQLITE_DROP = [
    "DROP TRIGGER IF EXISTS orchestration_chunk_fts_au",
    "DROP TRIGGER IF EXISTS orchestration_chunk_fts_ad",
    "DROP TRIGGER IF EXISTS orchestration_chunk_fts_ai",
    "DROP TABLE IF EXISTS orchestration_chunk_fts",
]


def _run(schema_editor, statements_by_vendor):
    # Other vendors get no index; retrieve() refuses them with a clear error.
    for statement in statements_by_vendor.get(schema_editor.connection.vendor, []):
        schema_editor.execute(statement, params=None)


def search_index_create(apps, schema_editor):
    _run(schema_editor, {"postgresql": POSTGRES_CREATE, "sqlite": SQLITE_CREATE})


def search_index_drop(apps, schema_editor):
    _run(schema_editor, {"postgresql": POSTGRES_DROP, "sqlite": SQLITE_DROP})


class Migration(migrations.Migration):
    dependencies = [("orchestration", "0002_ledger_genesis")]

    operations = [
        migrations.CreateModel(
            name="Document",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                (
                    "source",
                    models.SlugField(help_text='a short slug, e.g. "policies"', max_length=64),
                ),
                ("title", models.CharField(max_length=200)),
                ("body", models.TextField()),
                ("created_at", models.DateTimeField(default=django.utils.timezone.now)),
            ],
            options={"ordering": ["id"]},
        ),
        migrations.CreateModel(
            name="Chunk",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("seq", models.PositiveIntegerField()),
                ("text", models.TextField()),
                (
                    "document",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="chunks",
                        to="orchestration.document",
                    ),
                ),
            ],
            options={
                "ordering": ["document_id", "seq"],
                "constraints": [
                    models.UniqueConstraint(
                        fields=("document", "seq"), name="chunk_document_seq_uniq"
                    )
                ],
            },
        ),
        migrations.RunPython(search_index_create, search_index_drop),
    ]
