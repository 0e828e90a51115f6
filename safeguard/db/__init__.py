"""The audit database: SQLAlchemy models, opening (migrated to head), and helpers that write runs and their evidence.

Tables (times are UTC ISO 8601 text such as ``2025-01-31T12:00:00.000000Z``, which sorts and hashes alike on
SQLite and PostgreSQL; ids of runs and models are 26-character ULIDs, which sort by creation time):

- ``runs``: one row per command (kind ``apply`` | ``probe`` | ``audit`` | ``revert``, status ``running`` | ``done`` |
  ``failed``), who ran it where (``user``, ``host``, ``pid``, ``argv``), package ``versions``, the policy (name,
  sha256, text, canonical JSON), lineage (``parent_run_id``), input/output model, eraser name/version/params, seed,
  error and ``stats``.
- ``models``: a model folder or hub id (``path``) at a ``revision`` with every file's path, sha256 and size and
  ``tree_sha256``, one hash over that list; unique on (``tree_sha256``, ``path``). ``role`` is the role it was first
  recorded in; ``Database.run_models`` gives its role in a given run.
- ``concept_edits``: per run and concept, the category, forget and retain prompts and edit statistics.
- ``layer_edits``: per run, each edited module path with its statistics (ranks, variance, delta norms, rows, seconds).
- ``probe_results``: per run, probe and concept (replaced as a whole by ``replace_probe_results`` when a resumed probe
  recomputes them): status ``pass`` | ``fail`` | ``unassessed``, n, hits, rate,
  confidence interval, threshold, details and the judge (name, version, weights sha256).
- ``samples``: every generated image a probe judged; unique on (run, probe, concept, model_role, prompt, seed) so a
  resumed probe never records a sample twice.
- ``gate_decisions``: per run, the verdict, the exit code it maps to and the reasons.
- ``audit_events``: the append-only hash chain (``seq``, ``run_id``, ``event``, ``payload``, ``created_at``,
  ``prev_hash``, ``row_hash``); each event that writes evidence carries, under ``payload["records"]``, the sha256 of
  every row it wrote (None for a row it deleted), so ``safeguard.integrity.verify_chain`` also catches edits to the
  evidence tables.
- ``audit_head``: one row holding the chain's last ``seq`` and ``row_hash``, updated with every event, so a truncated
  tail is caught.

Guard triggers (created by the migration) reject UPDATE and DELETE on ``audit_events`` and any ``audit_head``
change that does not advance it by one event. They are guard rails: tamper evidence comes from the chain.
"""
from safeguard.db.chain import append_event, row_digests
from safeguard.db.connection import (SQLITE_BUSY_TIMEOUT_S, alembic_config, create_db_engine, default_url,
                                     migrations_folder, open_db, schema_head)
from safeguard.db.schema import (EVIDENCE_MODELS, MODEL_ROLES, NAMING_CONVENTION, PROBE_STATUSES, RUN_KINDS,
                                 RUN_STATUSES, AuditEvent, AuditHead, Base, ConceptEdit, GateDecision, LayerEdit,
                                 Model, ProbeResult, Run, Sample)
from safeguard.db.store import Database, collect_versions
from safeguard.db.values import (GENESIS_HASH, canonical_json, event_row_hash, json_document, json_value,
                                 model_file_list, new_id, record_digest, tree_sha256, utc_now)

__all__ = ["AuditEvent", "AuditHead", "Base", "ConceptEdit", "Database", "EVIDENCE_MODELS", "GENESIS_HASH",
           "GateDecision", "LayerEdit", "MODEL_ROLES", "Model", "NAMING_CONVENTION", "PROBE_STATUSES", "ProbeResult",
           "RUN_KINDS", "RUN_STATUSES", "Run", "SQLITE_BUSY_TIMEOUT_S", "Sample", "alembic_config", "append_event",
           "canonical_json", "collect_versions", "create_db_engine", "default_url", "event_row_hash", "json_document",
           "json_value", "migrations_folder", "model_file_list", "new_id", "open_db", "record_digest", "row_digests",
           "schema_head", "tree_sha256", "utc_now"]
