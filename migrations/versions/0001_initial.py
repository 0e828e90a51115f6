"""The initial audit schema: runs, models, edits, probe results, samples, gate decisions and the audit chain.

Revision ID: 0001
Revises:
Create Date: 2025-12-01
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

GENESIS_HASH = "0" * 64

# Guard rails, not security: anyone holding the file can drop them; the hash chain is what shows tampering.
SQLITE_TRIGGERS = {
    "audit_events_no_update": """
        CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
        BEGIN SELECT RAISE(ABORT, 'audit_events is append-only: rows cannot be changed'); END""",
    "audit_events_no_delete": """
        CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
        BEGIN SELECT RAISE(ABORT, 'audit_events is append-only: rows cannot be deleted'); END""",
    "audit_events_extend_head": """
        CREATE TRIGGER audit_events_extend_head BEFORE INSERT ON audit_events
        WHEN NEW.seq IS NOT (SELECT seq + 1 FROM audit_head WHERE id = 1)
          OR NEW.prev_hash IS NOT (SELECT row_hash FROM audit_head WHERE id = 1)
        BEGIN SELECT RAISE(ABORT, 'audit_events only grows at the head of the chain'); END""",
    "audit_head_advance_only": """
        CREATE TRIGGER audit_head_advance_only BEFORE UPDATE ON audit_head
        WHEN NEW.id IS NOT OLD.id OR NEW.seq IS NOT OLD.seq + 1
          OR NOT EXISTS (SELECT 1 FROM audit_events WHERE seq = NEW.seq AND row_hash = NEW.row_hash)
        BEGIN SELECT RAISE(ABORT, 'audit_head only advances to the event just appended'); END""",
    "audit_head_no_delete": """
        CREATE TRIGGER audit_head_no_delete BEFORE DELETE ON audit_head
        BEGIN SELECT RAISE(ABORT, 'audit_head cannot be deleted'); END""",
}

POSTGRESQL_FUNCTIONS = {
    "safeguard_audit_append_only": """
        CREATE FUNCTION safeguard_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION '% is append-only: % is not allowed', TG_TABLE_NAME, TG_OP;
        END $$""",
    "safeguard_audit_extend_head": """
        CREATE FUNCTION safeguard_audit_extend_head() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM audit_head
                           WHERE id = 1 AND seq + 1 = NEW.seq AND row_hash = NEW.prev_hash) THEN
                RAISE EXCEPTION 'audit_events only grows at the head of the chain';
            END IF;
            RETURN NEW;
        END $$""",
    "safeguard_audit_head_advance": """
        CREATE FUNCTION safeguard_audit_head_advance() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.id <> OLD.id OR NEW.seq <> OLD.seq + 1 OR NOT EXISTS (
                    SELECT 1 FROM audit_events WHERE seq = NEW.seq AND row_hash = NEW.row_hash) THEN
                RAISE EXCEPTION 'audit_head only advances to the event just appended';
            END IF;
            RETURN NEW;
        END $$""",
}

POSTGRESQL_TRIGGERS = {
    ("audit_events_append_only", "audit_events"):
        "BEFORE UPDATE OR DELETE ON audit_events FOR EACH ROW EXECUTE FUNCTION safeguard_audit_append_only()",
    ("audit_events_no_truncate", "audit_events"):
        "BEFORE TRUNCATE ON audit_events FOR EACH STATEMENT EXECUTE FUNCTION safeguard_audit_append_only()",
    ("audit_events_extend_head", "audit_events"):
        "BEFORE INSERT ON audit_events FOR EACH ROW EXECUTE FUNCTION safeguard_audit_extend_head()",
    ("audit_head_advance_only", "audit_head"):
        "BEFORE UPDATE ON audit_head FOR EACH ROW EXECUTE FUNCTION safeguard_audit_head_advance()",
    ("audit_head_no_delete", "audit_head"):
        "BEFORE DELETE ON audit_head FOR EACH ROW EXECUTE FUNCTION safeguard_audit_append_only()",
    ("audit_head_no_truncate", "audit_head"):
        "BEFORE TRUNCATE ON audit_head FOR EACH STATEMENT EXECUTE FUNCTION safeguard_audit_append_only()",
}


def _time() -> sa.String:
    return sa.String(32)


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.String(26), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("revision", sa.String(255), nullable=True),
        sa.Column("role", sa.String(32), nullable=True),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("tree_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("tree_sha256", "path", name=op.f("uq_models_tree_sha256_path")),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.String(26), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", _time(), nullable=False),
        sa.Column("finished_at", _time(), nullable=True),
        sa.Column("user", sa.String(255), nullable=True),
        sa.Column("host", sa.String(255), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("argv", sa.JSON(), nullable=False),
        sa.Column("versions", sa.JSON(), nullable=False),
        sa.Column("policy_name", sa.String(255), nullable=True),
        sa.Column("policy_sha256", sa.String(64), nullable=True),
        sa.Column("policy_text", sa.Text(), nullable=True),
        sa.Column("policy_canonical_json", sa.Text(), nullable=True),
        sa.Column("parent_run_id", sa.String(26), nullable=True),
        sa.Column("input_model_id", sa.String(26), nullable=True),
        sa.Column("output_model_id", sa.String(26), nullable=True),
        sa.Column("eraser_name", sa.String(255), nullable=True),
        sa.Column("eraser_version", sa.String(64), nullable=True),
        sa.Column("eraser_params", sa.JSON(), nullable=True),
        sa.Column("seed", sa.BigInteger(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("stats", sa.JSON(), nullable=True),
        sa.CheckConstraint("kind IN ('apply', 'probe', 'audit', 'revert')", name=op.f("ck_runs_kind")),
        sa.CheckConstraint("status IN ('running', 'done', 'failed')", name=op.f("ck_runs_status")),
        sa.ForeignKeyConstraint(["parent_run_id"], ["runs.id"], name=op.f("fk_runs_parent_run_id_runs")),
        sa.ForeignKeyConstraint(["input_model_id"], ["models.id"], name=op.f("fk_runs_input_model_id_models")),
        sa.ForeignKeyConstraint(["output_model_id"], ["models.id"], name=op.f("fk_runs_output_model_id_models")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
    )
    op.create_index(op.f("ix_runs_status"), "runs", ["status"])
    op.create_index(op.f("ix_runs_started_at"), "runs", ["started_at"])
    op.create_index(op.f("ix_runs_parent_run_id"), "runs", ["parent_run_id"])

    op.create_table(
        "concept_edits",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(26), nullable=False),
        sa.Column("concept", sa.String(255), nullable=False),
        sa.Column("category", sa.String(255), nullable=True),
        sa.Column("forget_prompts", sa.JSON(), nullable=False),
        sa.Column("retain_prompts", sa.JSON(), nullable=False),
        sa.Column("stats", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_concept_edits_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_concept_edits")),
        sa.UniqueConstraint("run_id", "concept", name=op.f("uq_concept_edits_run_id_concept")),
    )
    op.create_table(
        "layer_edits",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(26), nullable=False),
        sa.Column("module", sa.Text(), nullable=False),
        sa.Column("stats", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_layer_edits_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_layer_edits")),
    )
    op.create_index(op.f("ix_layer_edits_run_id"), "layer_edits", ["run_id"])

    op.create_table(
        "probe_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(26), nullable=False),
        sa.Column("concept", sa.String(255), nullable=False),
        sa.Column("probe", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("hits", sa.Integer(), nullable=True),
        sa.Column("rate", sa.Float(), nullable=True),
        sa.Column("ci_low", sa.Float(), nullable=True),
        sa.Column("ci_high", sa.Float(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=True),
        sa.Column("judge_name", sa.String(255), nullable=True),
        sa.Column("judge_version", sa.String(64), nullable=True),
        sa.Column("judge_sha256", sa.String(64), nullable=True),
        sa.CheckConstraint("status IN ('pass', 'fail', 'unassessed')", name=op.f("ck_probe_results_status")),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_probe_results_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_probe_results")),
        sa.UniqueConstraint("run_id", "probe", "concept", name=op.f("uq_probe_results_run_id_probe_concept")),
    )
    op.create_table(
        "samples",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(26), nullable=False),
        sa.Column("probe", sa.String(255), nullable=False),
        sa.Column("concept", sa.String(255), nullable=False),
        sa.Column("model_role", sa.String(16), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("image_path", sa.Text(), nullable=True),
        sa.Column("image_sha256", sa.String(64), nullable=True),
        sa.Column("scores", sa.JSON(), nullable=True),
        sa.Column("label", sa.String(255), nullable=True),
        sa.Column("created_at", _time(), nullable=False),
        sa.CheckConstraint("model_role IN ('original', 'edited')", name=op.f("ck_samples_model_role")),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_samples_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_samples")),
        sa.UniqueConstraint("run_id", "probe", "concept", "model_role", "prompt", "seed", name=op.f("uq_samples_key")),
    )
    op.create_table(
        "gate_decisions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(26), nullable=False),
        sa.Column("verdict", sa.String(32), nullable=False),
        sa.Column("exit_code", sa.Integer(), nullable=False),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_gate_decisions_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_gate_decisions")),
    )
    op.create_index(op.f("ix_gate_decisions_run_id"), "gate_decisions", ["run_id"])

    op.create_table(
        "audit_events",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("run_id", sa.String(26), nullable=True),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("row_hash", sa.String(64), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_audit_events_run_id_runs")),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_events")),
        sa.UniqueConstraint("row_hash", name=op.f("uq_audit_events_row_hash")),
    )
    op.create_index(op.f("ix_audit_events_run_id"), "audit_events", ["run_id"])

    audit_head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("row_hash", sa.String(64), nullable=False),
        sa.Column("updated_at", _time(), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_audit_head_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_head")),
    )
    op.bulk_insert(audit_head, [{"id": 1, "seq": 0, "row_hash": GENESIS_HASH,
                                 "updated_at": "1970-01-01T00:00:00.000000Z"}])

    dialect = op.get_context().dialect.name
    if dialect == "sqlite":
        for statement in SQLITE_TRIGGERS.values():
            op.execute(statement)
    elif dialect == "postgresql":
        for statement in POSTGRESQL_FUNCTIONS.values():
            op.execute(statement)
        for (name, _table), definition in POSTGRESQL_TRIGGERS.items():
            op.execute(f"CREATE TRIGGER {name} {definition}")


def downgrade() -> None:
    dialect = op.get_context().dialect.name
    if dialect == "sqlite":
        for name in SQLITE_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    elif dialect == "postgresql":
        for name, table in POSTGRESQL_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
        for name in POSTGRESQL_FUNCTIONS:
            op.execute(f"DROP FUNCTION IF EXISTS {name}()")
    op.drop_table("audit_head")
    op.drop_index(op.f("ix_audit_events_run_id"), table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_index(op.f("ix_gate_decisions_run_id"), table_name="gate_decisions")
    op.drop_table("gate_decisions")
    op.drop_table("samples")
    op.drop_table("probe_results")
    op.drop_index(op.f("ix_layer_edits_run_id"), table_name="layer_edits")
    op.drop_table("layer_edits")
    op.drop_table("concept_edits")
    op.drop_index(op.f("ix_runs_parent_run_id"), table_name="runs")
    op.drop_index(op.f("ix_runs_started_at"), table_name="runs")
    op.drop_index(op.f("ix_runs_status"), table_name="runs")
    op.drop_table("runs")
    op.drop_table("models")
