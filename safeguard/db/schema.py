"""The ORM schema: one class per table (see :mod:`safeguard.db` for what each holds), with named constraints so
SQLite batch migrations stay possible."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import (JSON, BigInteger, CheckConstraint, Float, ForeignKey, Integer, MetaData, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from .values import json_document, json_value, new_id

RUN_KINDS = ("apply", "probe", "audit", "revert")
RUN_STATUSES = ("running", "done", "failed")
PROBE_STATUSES = ("pass", "fail", "unassessed")
MODEL_ROLES = ("original", "edited")


NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _one_of(column: str, values: tuple[str, ...]) -> CheckConstraint:
    return CheckConstraint(f"{column} IN ({', '.join(repr(v) for v in values)})", name=column)


class Base(DeclarativeBase):
    """Declarative base; named constraints keep SQLite batch migrations possible."""
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Model(Base):
    """A model folder or hub id at a revision, identified by the hashes of its files."""
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("tree_sha256", "path"),)

    id: Mapped[str] = mapped_column(String(26), primary_key=True, default=new_id)
    path: Mapped[str] = mapped_column(Text)  # folder path, or hub id for a model known only by name
    revision: Mapped[str | None] = mapped_column(String(255))
    role: Mapped[str | None] = mapped_column(String(32))  # the role it was first recorded in: "input", "output"
    files: Mapped[list[Any]] = mapped_column(JSON)  # [{path, sha256, size}] sorted by path
    tree_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[str] = mapped_column(String(32))


class Run(Base):
    """One safeguard command: what ran, on what, under which policy, and how it ended."""
    __tablename__ = "runs"
    __table_args__ = (_one_of("kind", RUN_KINDS), _one_of("status", RUN_STATUSES))

    id: Mapped[str] = mapped_column(String(26), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    started_at: Mapped[str] = mapped_column(String(32), index=True)
    finished_at: Mapped[str | None] = mapped_column(String(32))
    # Raw SQL on PostgreSQL must quote this column ("user"): unquoted, user means CURRENT_USER.
    user: Mapped[str | None] = mapped_column(String(255))
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)  # lets a later command tell a crashed run from a live one
    argv: Mapped[list[Any]] = mapped_column(JSON)
    versions: Mapped[dict[str, Any]] = mapped_column(JSON)  # safeguard, plugins, torch, diffusers, ..., python
    policy_name: Mapped[str | None] = mapped_column(String(255))
    policy_sha256: Mapped[str | None] = mapped_column(String(64))
    policy_text: Mapped[str | None] = mapped_column(Text)
    policy_path: Mapped[str | None] = mapped_column(Text)
    policy_canonical_json: Mapped[str | None] = mapped_column(Text)
    parent_run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id"), index=True)
    input_model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id"))
    output_model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id"))
    eraser_name: Mapped[str | None] = mapped_column(String(255))
    eraser_version: Mapped[str | None] = mapped_column(String(64))
    eraser_params: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    seed: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(Text)
    stats: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    parent: Mapped[Run | None] = relationship(remote_side=[id])
    input_model: Mapped[Model | None] = relationship(foreign_keys=[input_model_id])
    output_model: Mapped[Model | None] = relationship(foreign_keys=[output_model_id])
    concept_edits: Mapped[list[ConceptEdit]] = relationship(order_by="ConceptEdit.id")
    layer_edits: Mapped[list[LayerEdit]] = relationship(order_by="LayerEdit.id")
    probe_results: Mapped[list[ProbeResult]] = relationship(order_by="ProbeResult.id")
    samples: Mapped[list[Sample]] = relationship(order_by="Sample.id")
    gate_decisions: Mapped[list[GateDecision]] = relationship(order_by="GateDecision.id")
    events: Mapped[list[AuditEvent]] = relationship(order_by="AuditEvent.seq")


class ConceptEdit(Base):
    """One erased concept of a run, with the prompts that defined it."""
    __tablename__ = "concept_edits"
    __table_args__ = (UniqueConstraint("run_id", "concept"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    concept: Mapped[str] = mapped_column(String(255))
    category: Mapped[str | None] = mapped_column(String(255))
    forget_prompts: Mapped[list[Any]] = mapped_column(JSON, default=list)
    retain_prompts: Mapped[list[Any]] = mapped_column(JSON, default=list)
    stats: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class LayerEdit(Base):
    """One edited module of a run, with its statistics."""
    __tablename__ = "layer_edits"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    module: Mapped[str] = mapped_column(Text)  # dotted path inside the denoiser
    stats: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class ProbeResult(Base):
    """A probe's verdict for one concept: counts, rate, confidence interval, threshold and the judge used."""
    __tablename__ = "probe_results"
    __table_args__ = (UniqueConstraint("run_id", "probe", "concept"), _one_of("status", PROBE_STATUSES))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    concept: Mapped[str] = mapped_column(String(255))
    probe: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16))
    n: Mapped[int] = mapped_column(Integer)
    hits: Mapped[int | None] = mapped_column(Integer)  # None for screens that count no hits
    rate: Mapped[float | None] = mapped_column(Float)
    ci_low: Mapped[float | None] = mapped_column(Float)
    ci_high: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    judge_name: Mapped[str | None] = mapped_column(String(255))
    judge_version: Mapped[str | None] = mapped_column(String(64))
    judge_sha256: Mapped[str | None] = mapped_column(String(64))


class Sample(Base):
    """One generated image a probe judged; unique per (run, probe, concept, model_role, prompt, seed)."""
    __tablename__ = "samples"
    __table_args__ = (
        UniqueConstraint("run_id", "probe", "concept", "model_role", "prompt", "seed", name="uq_samples_key"),
        _one_of("model_role", MODEL_ROLES))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    probe: Mapped[str] = mapped_column(String(255))
    concept: Mapped[str] = mapped_column(String(255))
    model_role: Mapped[str] = mapped_column(String(16))
    prompt: Mapped[str] = mapped_column(Text)
    seed: Mapped[int] = mapped_column(BigInteger)
    image_path: Mapped[str | None] = mapped_column(Text)
    image_sha256: Mapped[str | None] = mapped_column(String(64))
    scores: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    label: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[str] = mapped_column(String(32))


class GateDecision(Base):
    """The gate's verdict on a run and the exit code it maps to."""
    __tablename__ = "gate_decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    verdict: Mapped[str] = mapped_column(String(32))
    exit_code: Mapped[int] = mapped_column(Integer)
    reasons: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[str] = mapped_column(String(32))


class AuditEvent(Base):
    """One link of the append-only hash chain: row_hash = sha256(prev_hash + canonical JSON of the event)."""
    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id"), index=True)
    event: Mapped[str] = mapped_column(String(64))
    payload: Mapped[Any] = mapped_column(JSON)
    created_at: Mapped[str] = mapped_column(String(32))
    prev_hash: Mapped[str] = mapped_column(String(64))
    row_hash: Mapped[str] = mapped_column(String(64), unique=True)


class AuditHead(Base):
    """The single row (id 1) naming the chain's last event; seq 0 and the genesis hash while the chain is empty."""
    __tablename__ = "audit_head"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    row_hash: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[str] = mapped_column(String(32))


# Tables whose rows are covered by ``payload["records"]`` digests, by table name.
EVIDENCE_MODELS: dict[str, type[Base]] = {m.__tablename__: m for m in (
    Run, Model, ConceptEdit, LayerEdit, ProbeResult, Sample, GateDecision)}


def _prepare_row(model: type[Base], values: Mapping[str, Any], where: str) -> dict[str, Any]:
    json_columns = {column.key for column in model.__table__.columns if isinstance(column.type, JSON)}
    return {key: (json_document if key in json_columns else json_value)(value, f"{where}.{key}")
            for key, value in values.items()}
