"""The database keeps the chain linear and has no exit from append-only but pruning's.

Every inserted record must extend the chain's head: its ``seq`` one past the head's, its
``prev_hash`` the head's hash. The insert itself advances the head (a trigger), so a record can
no longer sit beyond the head, where verification did not look and every later append collided
with it. The head moves only that way: one step, to the record just inserted that links to it;
it is created only at genesis on an empty ledger and never deleted. ``ledger_append`` writes
nothing to the head itself: without these triggers appends stop after the first, so the guard
cannot silently go missing.

Records are never updated or truncated. DELETE is allowed only of the records below the boundary
named by the latest ``ledger.pruned`` record (``{"below": <seq>, ...}``, never above its own
``seq``). That record is itself a link of the chain, so deleting leaves its proof in the chain
(and a signed prune checkpoint outside it, see ``orchestration.ledger.retention``). There is no
other exit: the session setting 0008 read for the test database's flush is gone; the tests flush
as a superuser with triggers off (``session_replication_role``), which no application role has.

SQLite gets the linking and the head's triggers (a trigger cannot tell pruning or the test flush
from anything else there, and whoever can write the file can rewrite it). A later migration that
rebuilds the audit or head table on SQLite drops its triggers and must create them again.
"""

from importlib import import_module

from django.db import migrations

GENESIS_HASH = "0" * 64
PRUNED_VERB = "ledger.pruned"

GUARD = "baton_ledger_guard"  # 0008's: now refuses UPDATE and TRUNCATE, with no exit
ROW_TRIGGER = "baton_ledger_no_change"
TRUNCATE_TRIGGER = "baton_ledger_no_truncate"
PRUNE_GUARD, PRUNE_TRIGGER = "baton_ledger_prune_guard", "baton_ledger_prune_only"
LINK, LINK_TRIGGER = "baton_ledger_link", "baton_ledger_link"
HEAD_GUARD, HEAD_TRIGGER = "baton_ledger_head_guard", "baton_ledger_head_only_advances"
HEAD_TRUNCATE_TRIGGER = "baton_ledger_head_no_truncate"
SQLITE_HEAD_UPDATE, SQLITE_HEAD_INSERT = "baton_ledger_head_advance", "baton_ledger_head_create"

# Written with str.format: {records} and {head} are the quoted table names, the other fields the
# names above; "%" is plpgsql's, not a placeholder.
POSTGRESQL = [
    """
CREATE OR REPLACE FUNCTION {guard}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'The audit ledger is append-only: % on % is refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$""",
    "DROP TRIGGER {row_trigger} ON {records}",
    "CREATE TRIGGER {row_trigger} BEFORE UPDATE ON {records} "
    "FOR EACH ROW EXECUTE FUNCTION {guard}()",
    """
CREATE FUNCTION {prune_guard}() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    boundary bigint;
    refused bigint;
BEGIN
    -- The latest such record, even if this statement deletes it (then it vouches for nothing).
    SELECT CASE WHEN payload::jsonb ->> 'below' ~ '^[0-9]{{1,18}}$'
                THEN least((payload::jsonb ->> 'below')::bigint, seq) END
        INTO boundary
        FROM (SELECT seq, payload FROM {records} WHERE verb = '{pruned}'
              UNION ALL SELECT seq, payload FROM gone WHERE verb = '{pruned}') AS pruned
        ORDER BY seq DESC LIMIT 1;
    SELECT min(seq) INTO refused FROM gone WHERE boundary IS NULL OR seq >= boundary;
    IF refused IS NOT NULL THEN
        RAISE EXCEPTION 'The audit ledger is append-only: record #% is not below the boundary '
            '(%) of the latest {pruned} record', refused, coalesce(boundary::text, 'none')
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NULL;
END;
$$""",
    "CREATE TRIGGER {prune_trigger} AFTER DELETE ON {records} REFERENCING OLD TABLE AS gone "
    "FOR EACH STATEMENT EXECUTE FUNCTION {prune_guard}()",
    """
CREATE FUNCTION {link}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE {head} SET seq = NEW.seq, hash = NEW.hash
        WHERE id = 1 AND seq = NEW.seq - 1 AND hash = NEW.prev_hash;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'The audit ledger is append-only: record #% does not extend the '
            'chain''s head (records are appended through ledger_append)', NEW.seq
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NULL;
END;
$$""",
    "CREATE TRIGGER {link_trigger} AFTER INSERT ON {records} "
    "FOR EACH ROW EXECUTE FUNCTION {link}()",
    """
CREATE FUNCTION {head_guard}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW.id = OLD.id AND NEW.seq = OLD.seq + 1 AND EXISTS (
            SELECT 1 FROM {records}
            WHERE seq = NEW.seq AND hash = NEW.hash AND prev_hash = OLD.hash
        ) THEN
            RETURN NEW;
        END IF;
    ELSIF TG_OP = 'INSERT' THEN
        -- Only the genesis head of an empty ledger, or one that conflicts with the head there
        -- (a concurrent first append created it: ON CONFLICT DO NOTHING then writes nothing).
        IF NEW.id = 1 AND NEW.seq = 0 AND NEW.hash = '{genesis}' AND (
            NOT EXISTS (SELECT 1 FROM {records}) OR EXISTS (SELECT 1 FROM {head} WHERE id = 1)
        ) THEN
            RETURN NEW;
        END IF;
    END IF;
    RAISE EXCEPTION 'The audit ledger''s head only advances to the record appended after it: '
        '% on % is refused', TG_OP, TG_TABLE_NAME USING ERRCODE = 'insufficient_privilege';
END;
$$""",
    "CREATE TRIGGER {head_trigger} BEFORE INSERT OR UPDATE OR DELETE ON {head} "
    "FOR EACH ROW EXECUTE FUNCTION {head_guard}()",
    "CREATE TRIGGER {head_truncate_trigger} BEFORE TRUNCATE ON {head} "
    "FOR EACH STATEMENT EXECUTE FUNCTION {head_guard}()",
]

SQLITE = [
    """
CREATE TRIGGER {link_trigger} AFTER INSERT ON {records}
BEGIN
    SELECT RAISE(ABORT, 'The audit ledger is append-only: a record must extend the chain''s head')
    WHERE NOT EXISTS (
        SELECT 1 FROM {head} WHERE id = 1 AND seq = NEW.seq - 1 AND hash = NEW.prev_hash
    );
    UPDATE {head} SET seq = NEW.seq, hash = NEW.hash WHERE id = 1;
END""",
    """
CREATE TRIGGER {sqlite_head_update} BEFORE UPDATE ON {head}
WHEN NOT (NEW.id = OLD.id AND NEW.seq = OLD.seq + 1 AND EXISTS (
    SELECT 1 FROM {records} WHERE seq = NEW.seq AND hash = NEW.hash AND prev_hash = OLD.hash
))
BEGIN
    SELECT RAISE(ABORT, 'The audit ledger''s head only advances to the record appended after it');
END""",
    """
CREATE TRIGGER {sqlite_head_insert} BEFORE INSERT ON {head}
WHEN NOT (NEW.id = 1 AND NEW.seq = 0 AND NEW.hash = '{genesis}'
    AND NOT EXISTS (SELECT 1 FROM {records}))
BEGIN
    SELECT RAISE(ABORT, 'The audit ledger''s head is created only on an empty ledger');
END""",
]

NAMES = {
    "genesis": GENESIS_HASH,
    "pruned": PRUNED_VERB,
    "guard": GUARD,
    "row_trigger": ROW_TRIGGER,
    "prune_guard": PRUNE_GUARD,
    "prune_trigger": PRUNE_TRIGGER,
    "link": LINK,
    "link_trigger": LINK_TRIGGER,
    "head_guard": HEAD_GUARD,
    "head_trigger": HEAD_TRIGGER,
    "head_truncate_trigger": HEAD_TRUNCATE_TRIGGER,
    "sqlite_head_update": SQLITE_HEAD_UPDATE,
    "sqlite_head_insert": SQLITE_HEAD_INSERT,
}


def _tables(apps, schema_editor) -> dict[str, str]:
    quote = schema_editor.quote_name
    return {
        "records": quote(apps.get_model("orchestration", "AuditRecord")._meta.db_table),
        "head": quote(apps.get_model("orchestration", "LedgerHead")._meta.db_table),
    }


def install(apps, schema_editor):
    statements = {"postgresql": POSTGRESQL, "sqlite": SQLITE}.get(schema_editor.connection.vendor)
    tables = _tables(apps, schema_editor)
    for statement in statements or []:
        schema_editor.execute(statement.format(**tables, **NAMES), params=None)


def remove(apps, schema_editor):
    vendor, tables = schema_editor.connection.vendor, _tables(apps, schema_editor)
    if vendor == "sqlite":
        for trigger in (LINK_TRIGGER, SQLITE_HEAD_UPDATE, SQLITE_HEAD_INSERT):
            schema_editor.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    if vendor != "postgresql":
        return
    for trigger, table in [
        (HEAD_TRUNCATE_TRIGGER, "head"),
        (HEAD_TRIGGER, "head"),
        (LINK_TRIGGER, "records"),
        (PRUNE_TRIGGER, "records"),
        (ROW_TRIGGER, "records"),
        (TRUNCATE_TRIGGER, "records"),
    ]:
        schema_editor.execute(f"DROP TRIGGER IF EXISTS {trigger} ON {tables[table]}")
    for function in (HEAD_GUARD, LINK, PRUNE_GUARD):
        schema_editor.execute(f"DROP FUNCTION IF EXISTS {function}()")
    import_module("orchestration.migrations.0008_ledger_append_only").install_guard(
        apps, schema_editor
    )


class Migration(migrations.Migration):
    dependencies = [
        ("orchestration", "0010_step_name_started_index"),
    ]

    operations = [migrations.RunPython(install, remove)]
