"""The store: :class:`Database`, whose helpers write runs and their evidence, each with its audit event in one
transaction, and read them back as plain dicts."""
from __future__ import annotations

import dataclasses
import os
import socket
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session, sessionmaker

from safeguard.errors import AuditError
from safeguard.provenance import actor, collect_versions

from .chain import _records_payload, append_event
from .connection import READ_ONLY, _location
from .schema import (MODEL_ROLES, PROBE_STATUSES, RUN_KINDS, AuditEvent, AuditHead, Base, ConceptEdit, GateDecision,
                     LayerEdit, Model, ProbeResult, Run, Sample, _prepare_row)
from .values import json_document, json_value, model_file_list, new_id, tree_sha256 as _tree_sha256, utc_now


def _as_mapping(item: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return dataclasses.asdict(item)
    return dict(item)


def _columns(obj: Base) -> dict[str, Any]:
    return {attr.key: getattr(obj, attr.key) for attr in obj.__mapper__.column_attrs}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


_UPDATABLE_RUN_FIELDS = ("input_model_id", "output_model_id", "eraser_name", "eraser_version", "eraser_params",
                         "seed", "stats")


class Database:
    """An open audit database. Each helper writes its rows and their audit event in one transaction: its own, or
    the caller's when given ``session=`` (from ``Database.session()``) to make several writes one transaction."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.url = engine.url.render_as_string(hide_password=True)
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)

    def __repr__(self) -> str:
        return f"Database({self.url!r})"

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def location(self) -> str:
        """The SQLite file (or ``:memory:``), else the URL without its password."""
        return _location(self.engine.url)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A write transaction: commits when the block ends, rolls back if it raises (SQLite: BEGIN IMMEDIATE)."""
        with self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """A read-only transaction that never waits for writers (do not write in it)."""
        with self._read_sessions() as session, session.begin():
            yield session

    @contextmanager
    def _writing(self, session: Session | None) -> Iterator[Session]:
        if session is not None:
            yield session
        else:
            with self.session() as own:
                yield own

    def evidence_dir(self) -> Path:
        """Where probe images go: ``evidence/`` beside a SQLite file, else ``.safeguard/evidence`` in the cwd."""
        database = self.engine.url.database if self.dialect == "sqlite" else None
        if database and database != ":memory:":
            folder = Path(database).expanduser().resolve().parent / "evidence"
        else:
            folder = Path.cwd() / ".safeguard" / "evidence"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _missing(self, what: str, fix: str = "pick a run id from the list of recorded runs") -> AuditError:
        return AuditError(f"{what} is not in the audit database", file=self.location, fix=fix)

    # runs

    def start_run(self, kind: str, *, policy: Any = None, policy_name: str | None = None,
                  policy_sha256: str | None = None, policy_text: str | None = None,
                  policy_canonical_json: str | None = None, parent_run_id: str | None = None,
                  input_model_id: str | None = None, eraser_name: str | None = None,
                  eraser_version: str | None = None, eraser_params: Mapping[str, Any] | None = None,
                  seed: int | None = None, argv: Iterable[str] | None = None,
                  versions: Mapping[str, Any] | None = None, user: str | None = None,
                  host: str | None = None) -> str:
        """Record a 'running' run and commit at once, so a crash leaves a visible running row; returns its id.

        ``policy`` may be a ``safeguard.policy.LoadedPolicy``, filling the four policy fields; ``versions`` adds to
        (or overrides) ``collect_versions()``, e.g. with CUDA and GPU details.
        """
        if kind not in RUN_KINDS:
            raise ValueError(f"run kind must be one of {', '.join(RUN_KINDS)}, not {kind!r}")
        if policy is not None:
            policy_name = policy_name or policy.policy.name
            policy_sha256 = policy_sha256 or policy.sha256
            policy_text = policy_text if policy_text is not None else policy.text
            policy_path = str(getattr(policy, "path", "") or "") or None
            policy_canonical_json = policy_canonical_json or policy.canonical_json
        who = actor()
        with self.session() as session:
            if parent_run_id is not None and session.get(Run, parent_run_id) is None:
                raise self._missing(f"parent run {parent_run_id}")
            if input_model_id is not None and session.get(Model, input_model_id) is None:
                raise self._missing(f"input model {input_model_id}", fix="record it with record_model first")
            run = Run(kind=kind, status="running", started_at=utc_now(),
                      user=user if user is not None else who["user"],
                      host=host if host is not None else who["host"], pid=os.getpid(),
                      argv=json_value(list(argv if argv is not None else sys.argv), "argv"),
                      versions=json_value({**collect_versions(), **(versions or {})}, "versions"),
                      policy_name=policy_name, policy_sha256=policy_sha256, policy_text=policy_text,
                      policy_path=policy_path if policy is not None else None,
                      policy_canonical_json=policy_canonical_json, parent_run_id=parent_run_id,
                      input_model_id=input_model_id, eraser_name=eraser_name, eraser_version=eraser_version,
                      eraser_params=json_document(eraser_params, "eraser_params"), seed=seed)
            session.add(run)
            session.flush()
            append_event(session, "run.started", {
                "kind": kind, "policy_sha256": policy_sha256, "parent_run_id": parent_run_id,
                "input_model_id": input_model_id, "eraser": eraser_name, "seed": seed,
                "records": _records_payload(session, Run, [run.id])}, run.id)
            return run.id

    def update_run(self, run_id: str, *, session: Session | None = None, **fields: Any) -> None:
        """Set fields of a running run (models, eraser, seed; ``stats`` is merged into what is there)."""
        unknown = sorted(set(fields) - set(_UPDATABLE_RUN_FIELDS))
        if unknown:
            raise ValueError(f"cannot update {', '.join(unknown)}; updatable: {', '.join(_UPDATABLE_RUN_FIELDS)}")
        with self._writing(session) as session:
            run = self._running_run(session, run_id)
            self._set_run_fields(session, run, fields)
            append_event(session, "run.updated", {"fields": sorted(fields),
                                                  "records": _records_payload(session, Run, [run.id])}, run.id)

    def _set_run_fields(self, session: Session, run: Run, fields: Mapping[str, Any]) -> None:
        for name, value in fields.items():
            if name in ("input_model_id", "output_model_id") and value is not None:
                if session.get(Model, value) is None:
                    raise self._missing(f"model {value}", fix="record it with record_model first")
            if name == "stats":
                value = {**(run.stats or {}), **(json_document(value, "stats") or {})}
            elif name == "eraser_params":
                value = json_document(value, name)
            setattr(run, name, value)

    def finish_run(self, run_id: str, status: str, error: str | None = None,
                   stats: Mapping[str, Any] | None = None, *, input_model_id: str | None = None,
                   output_model_id: str | None = None, session: Session | None = None) -> None:
        """End a running run as 'done' or 'failed'; ``stats`` is merged into the run's stats."""
        if status not in ("done", "failed"):
            raise ValueError(f"a run finishes as 'done' or 'failed', not {status!r}")
        with self._writing(session) as session:
            run = self._running_run(session, run_id)
            models = {k: v for k, v in (("input_model_id", input_model_id), ("output_model_id", output_model_id))
                      if v is not None}
            self._set_run_fields(session, run, models)
            self._finish(session, run, status, error, stats)

    def _finish(self, session: Session, run: Run, status: str, error: str | None,
                stats: Mapping[str, Any] | None) -> None:
        run.status, run.finished_at, run.error = status, utc_now(), error
        if stats is not None:
            run.stats = {**(run.stats or {}), **(json_document(stats, "stats") or {})}
        append_event(session, "run.finished", {"status": status, "error": error,
                                               "records": _records_payload(session, Run, [run.id])}, run.id)

    def reopen_run(self, run_id: str, *, session: Session | None = None) -> None:
        """Set a failed (or crashed, still 'running') run running again in this process, to resume it."""
        with self._writing(session) as session:
            run = session.execute(select(Run).where(Run.id == run_id).with_for_update()).scalar_one_or_none()
            if run is None:
                raise self._missing(f"run {run_id}")
            if run.status == "done":
                raise AuditError(f"run {run_id} is done; there is nothing to resume", file=self.location,
                                 fix="start a new run with this one as its parent")
            previous = {"status": run.status, "error": run.error, "pid": run.pid, "host": run.host}
            run.status, run.finished_at, run.error = "running", None, None
            run.pid, run.host = os.getpid(), socket.gethostname()
            append_event(session, "run.reopened", {"previous": previous,
                                                   "records": _records_payload(session, Run, [run.id])}, run.id)

    def mark_stale_running_runs_failed(self, older_than: timedelta | None = None) -> list[str]:
        """Fail 'running' runs whose process on this host is gone, or (given ``older_than``) that started before
        now - older_than; returns their ids."""
        this_host = socket.gethostname()
        cutoff = None
        if older_than is not None:
            cutoff = (datetime.now(timezone.utc) - older_than).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        stale = []
        with self.session() as session:
            # Lock the rows before the chain head, the order every writer takes them in (no deadlock).
            running = session.scalars(select(Run).where(Run.status == "running").order_by(Run.id).with_for_update())
            for run in running.all():
                crashed = run.host == this_host and run.pid is not None and not _pid_alive(run.pid)
                if crashed or (cutoff is not None and run.started_at < cutoff):
                    why = "its process is gone" if crashed else f"it was still running after {older_than}"
                    self._finish(session, run, "failed", f"interrupted: {why}", None)
                    stale.append(run.id)
        return stale

    def _running_run(self, session: Session, run_id: str) -> Run:
        run = session.execute(select(Run).where(Run.id == run_id).with_for_update()).scalar_one_or_none()
        if run is None:
            raise self._missing(f"run {run_id}")
        if run.status != "running":
            raise AuditError(f"run {run_id} has already finished ({run.status}); evidence is only added to a "
                             "running run", file=self.location, fix="start a new run with this one as its parent")
        return run

    # models

    def record_model(self, path: str | os.PathLike, revision: str | None = None, role: str | None = None,
                     files: Iterable[Mapping[str, Any]] = (), tree_sha256: str | None = None, *,
                     session: Session | None = None) -> str:
        """Record a model by its files ({path, sha256, size}); returns its id, the existing one if already recorded.

        ``tree_sha256`` is the hash over the file list; when given it must be ``safeguard.files.tree_sha256(files)``.
        """
        entries = model_file_list(files)
        tree = _tree_sha256(entries)
        if tree_sha256 is not None and tree_sha256 != tree:
            raise ValueError(f"tree_sha256 {tree_sha256} is not the hash of the file list ({tree})")
        path = os.fspath(path)
        with self._writing(session) as session:
            model_id = _insert_ignoring_duplicates(session, Model, {
                "id": new_id(), "path": path, "revision": revision, "role": role, "files": entries,
                "tree_sha256": tree, "created_at": utc_now()}, ("tree_sha256", "path"))
            if model_id is None:
                return session.scalars(select(Model.id).where(Model.tree_sha256 == tree, Model.path == path)).one()
            append_event(session, "model.recorded", {
                "path": path, "revision": revision, "role": role, "tree_sha256": tree, "files": len(entries),
                "records": _records_payload(session, Model, [model_id])})
            return model_id

    # evidence

    def _add_rows(self, run_id: str, model: type[Base], rows: Iterable[Any], event_name: str, label_field: str,
                  session: Session | None) -> list[int]:
        allowed = {attr.key for attr in model.__mapper__.column_attrs} - {"id", "run_id", "created_at"}
        prepared = []
        for i, row in enumerate(rows):
            values = _as_mapping(row)
            unknown = sorted(set(values) - allowed)
            if unknown:
                raise ValueError(f"{model.__tablename__}[{i}]: unknown field(s) {', '.join(unknown)}")
            prepared.append(_prepare_row(model, values, f"{model.__tablename__}[{i}]"))
        with self._writing(session) as session:
            self._running_run(session, run_id)
            objects = [model(run_id=run_id, **values) for values in prepared]
            session.add_all(objects)
            session.flush()
            ids = [obj.id for obj in objects]
            if ids:
                append_event(session, event_name, {label_field: [values.get(label_field) for values in prepared],
                                                   "records": _records_payload(session, model, ids)}, run_id)
            return ids

    def add_concept_edits(self, run_id: str, edits: Iterable[Mapping[str, Any]], *,
                          session: Session | None = None) -> list[int]:
        """Record erased concepts ({concept, category, forget_prompts, retain_prompts, stats})."""
        return self._add_rows(run_id, ConceptEdit, edits, "concept_edits.added", "concept", session)

    def add_layer_edits(self, run_id: str, edits: Iterable[Any], *, session: Session | None = None) -> list[int]:
        """Record edited modules ({module, stats} or ``safeguard.erasers.LayerEdit``)."""
        return self._add_rows(run_id, LayerEdit, edits, "layer_edits.added", "module", session)

    def add_probe_result(self, run_id: str, *, probe: str, concept: str, status: str, n: int, hits: int | None,
                         rate: float | None = None, ci_low: float | None = None, ci_high: float | None = None,
                         threshold: float | None = None, details: Mapping[str, Any] | None = None,
                         judge_name: str | None = None, judge_version: str | None = None,
                         judge_sha256: str | None = None, session: Session | None = None) -> int:
        """Record one probe's result for one concept; ``rate`` defaults to hits / n."""
        values = dict(probe=probe, concept=concept, status=status, n=n, hits=hits, rate=rate, ci_low=ci_low,
                      ci_high=ci_high, threshold=threshold, details=details, judge_name=judge_name,
                      judge_version=judge_version, judge_sha256=judge_sha256)
        with self._writing(session) as session:
            self._running_run(session, run_id)
            if session.scalars(select(ProbeResult.id).where(ProbeResult.run_id == run_id, ProbeResult.probe == probe,
                                                            ProbeResult.concept == concept)).first() is not None:
                raise AuditError(f"run {run_id} already has a {probe} result for {concept!r}", file=self.location,
                                 fix="use replace_probe_results to recompute a run's results")
            return self._insert_probe_results(session, run_id, [values], "probe_result.added", {})[0]

    def replace_probe_results(self, run_id: str, rows: Iterable[Mapping[str, Any]], *,
                              session: Session | None = None) -> list[int]:
        """Replace all of a running run's probe results with ``rows`` (as ``add_probe_result`` takes them)."""
        rows = [dict(row) for row in rows]
        with self._writing(session) as session:
            self._running_run(session, run_id)
            old = session.scalars(select(ProbeResult.id).where(ProbeResult.run_id == run_id)).all()
            if old:
                session.execute(delete(ProbeResult).where(ProbeResult.id.in_(old)))
            removed = {str(key): None for key in old}  # a None digest records a deliberate deletion
            return self._insert_probe_results(session, run_id, rows, "probe_results.replaced", removed)

    def _insert_probe_results(self, session: Session, run_id: str, rows: list[dict[str, Any]], event_name: str,
                              removed: dict[str, None]) -> list[int]:
        allowed = {attr.key for attr in ProbeResult.__mapper__.column_attrs} - {"id", "run_id"}
        objects = []
        for i, values in enumerate(rows):
            unknown = sorted(set(values) - allowed)
            if unknown:
                raise ValueError(f"probe_results[{i}]: unknown field(s) {', '.join(unknown)}")
            if values.get("status") not in PROBE_STATUSES:
                raise ValueError(f"probe_results[{i}]: status must be one of {', '.join(PROBE_STATUSES)}, "
                                 f"not {values.get('status')!r}")
            if values.get("rate") is None and values.get("n") and values.get("hits") is not None:
                values = {**values, "rate": values["hits"] / values["n"]}
            objects.append(ProbeResult(run_id=run_id, **_prepare_row(ProbeResult, values, f"probe_results[{i}]")))
        session.add_all(objects)
        session.flush()
        records = _records_payload(session, ProbeResult, [obj.id for obj in objects])
        records["probe_results"] = {**removed, **records["probe_results"]}
        append_event(session, event_name, {
            "results": [{"probe": obj.probe, "concept": obj.concept, "status": obj.status} for obj in objects],
            "records": records}, run_id)
        return [obj.id for obj in objects]

    def add_sample(self, run_id: str, *, probe: str, concept: str, model_role: str, prompt: str, seed: int,
                   image_path: str | os.PathLike | None = None, image_sha256: str | None = None,
                   scores: Mapping[str, Any] | None = None, label: str | None = None,
                   session: Session | None = None) -> bool:
        """Record one judged sample; False (and nothing written) if its key is already recorded."""
        return self.add_samples(run_id, [dict(probe=probe, concept=concept, model_role=model_role, prompt=prompt,
                                              seed=seed, image_path=image_path, image_sha256=image_sha256,
                                              scores=scores, label=label)], session=session) == 1

    def add_samples(self, run_id: str, samples: Iterable[Mapping[str, Any]], *,
                    session: Session | None = None) -> int:
        """Record judged samples, skipping keys already recorded; returns how many were new."""
        allowed = {"probe", "concept", "model_role", "prompt", "seed", "image_path", "image_sha256", "scores", "label"}
        required = {"probe", "concept", "model_role", "prompt", "seed"}
        prepared = []
        for i, sample in enumerate(samples):
            values = dict(sample)
            unknown, missing = sorted(set(values) - allowed), sorted(required - set(values))
            if unknown or missing:
                raise ValueError(f"samples[{i}]: " + "; ".join(
                    part for part in (unknown and f"unknown field(s) {', '.join(unknown)}",
                                      missing and f"missing field(s) {', '.join(missing)}") if part))
            if values["model_role"] not in MODEL_ROLES:
                raise ValueError(f"samples[{i}]: model_role must be one of {', '.join(MODEL_ROLES)}")
            prepared.append(_prepare_row(Sample, values, f"samples[{i}]"))
        with self._writing(session) as session:
            self._running_run(session, run_id)
            created_at = utc_now()
            ids = [sample_id for values in prepared
                   if (sample_id := _insert_ignoring_duplicates(
                       session, Sample, {**values, "run_id": run_id, "created_at": created_at},
                       ("run_id", "probe", "concept", "model_role", "prompt", "seed"))) is not None]
            if ids:
                append_event(session, "samples.added", {"count": len(ids),
                                                        "records": _records_payload(session, Sample, ids)}, run_id)
            return len(ids)

    def recorded_sample_keys(self, run_id: str) -> set[tuple[str, str, str, str, int]]:
        """The (probe, concept, model_role, prompt, seed) keys already recorded for a run."""
        with self.read_session() as session:
            rows = session.execute(select(Sample.probe, Sample.concept, Sample.model_role, Sample.prompt, Sample.seed)
                                   .where(Sample.run_id == run_id))
            return {tuple(row) for row in rows}

    def add_gate_decision(self, run_id: str, verdict: str, exit_code: int, reasons: Iterable[Any] = (), *,
                          session: Session | None = None) -> int:
        """Record the gate's verdict on a run (finished or not: the gate judges runs after they end)."""
        with self._writing(session) as session:
            if session.get(Run, run_id) is None:
                raise self._missing(f"run {run_id}")
            decision = GateDecision(run_id=run_id, verdict=verdict, exit_code=int(exit_code),
                                    reasons=json_value(list(reasons), "reasons"), created_at=utc_now())
            session.add(decision)
            session.flush()
            append_event(session, "gate_decision.added", {
                "verdict": verdict, "exit_code": int(exit_code),
                "records": _records_payload(session, GateDecision, [decision.id])}, run_id)
            return decision.id

    def record_event(self, event_name: str, payload: Any = None, run_id: str | None = None, *,
                     session: Session | None = None) -> int:
        """Append a free-standing audit event; returns its seq."""
        if isinstance(payload, Mapping) and "records" in payload:
            raise ValueError("the payload key 'records' is reserved for the digests of rows safeguard writes")
        with self._writing(session) as session:
            return append_event(session, event_name, payload, run_id).seq

    # reading (plain dicts of column values, JSON-serialisable)

    def get_run(self, run_id: str) -> dict[str, Any]:
        """The run with this id or a unique prefix of it."""
        with self.read_session() as session:
            return _columns(self._find_run(session, run_id))

    def _find_run(self, session: Session, run_id: str | None) -> Run:
        run = session.get(Run, run_id) if run_id else None
        if run is None and run_id:
            pattern = run_id.upper().replace("\\", "").replace("%", "").replace("_", "") + "%"
            matches = session.scalars(select(Run).where(Run.id.like(pattern)).limit(2)).all()
            if len(matches) > 1:
                raise AuditError(f"run id prefix {run_id!r} matches more than one run", file=self.location,
                                 fix="give more characters of the run id")
            run = matches[0] if matches else None
        if run is None:
            raise self._missing(f"run {run_id}")
        return run

    def list_runs(self, limit: int | None = 20, *, kind: str | None = None,
                  status: str | None = None) -> list[dict[str, Any]]:
        """Recorded runs, newest first."""
        query = select(Run).order_by(Run.started_at.desc(), Run.id.desc()).limit(limit)
        if kind is not None:
            query = query.where(Run.kind == kind)
        if status is not None:
            query = query.where(Run.status == status)
        with self.read_session() as session:
            return [_columns(run) for run in session.scalars(query)]

    def child_runs(self, run_id: str) -> list[dict[str, Any]]:
        """Runs whose parent is ``run_id``, oldest first."""
        with self.read_session() as session:
            query = select(Run).where(Run.parent_run_id == run_id).order_by(Run.started_at, Run.id)
            return [_columns(run) for run in session.scalars(query)]

    def run_models(self, run_id: str) -> list[dict[str, Any]]:
        """A run's input and output models, each with ``role`` "input" or "output" as it is for this run."""
        with self.read_session() as session:
            run = self._find_run(session, run_id)
            return [{**_columns(model), "role": role}
                    for role, model in (("input", run.input_model), ("output", run.output_model)) if model]

    def _rows(self, model: type[Base], run_id: str) -> list[dict[str, Any]]:
        with self.read_session() as session:
            query = select(model).where(model.run_id == run_id).order_by(model.id)
            return [_columns(row) for row in session.scalars(query)]

    def samples(self, run_id: str) -> list[dict[str, Any]]:
        """A run's recorded samples, in recording order."""
        return self._rows(Sample, run_id)

    def probe_results(self, run_id: str) -> list[dict[str, Any]]:
        """A run's probe results."""
        return self._rows(ProbeResult, run_id)

    def gate_decisions(self, run_id: str) -> list[dict[str, Any]]:
        """The gate's decisions on a run, oldest first."""
        return self._rows(GateDecision, run_id)

    def list_events(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Audit events in chain order, all or one run's."""
        query = select(AuditEvent).order_by(AuditEvent.seq)
        if run_id is not None:
            query = query.where(AuditEvent.run_id == run_id)
        with self.read_session() as session:
            return [_columns(e) for e in session.scalars(query)]

    def head(self) -> tuple[int, str]:
        """(seq, row_hash) of the chain's last event; (0, GENESIS_HASH) while it is empty."""
        with self.read_session() as session:
            head = session.get(AuditHead, 1)
            if head is None:
                raise AuditError("the audit_head row is missing", file=self.location,
                                 fix="run safeguard.integrity.verify_chain and restore the database from a backup")
            return head.seq, head.row_hash

    def run_as_dict(self, run_id: str) -> dict[str, Any]:
        """Everything recorded about a run, JSON-serialisable: ``{"run": {...}, "input_model", "output_model",
        "concept_edits", "layer_edits", "probe_results", "samples", "gate_decisions", "events", ...}``."""
        with self.read_session() as session:
            run = self._find_run(session, run_id)
            lineage, parent = [], run.parent
            while parent is not None and parent.id not in lineage:
                lineage.append(parent.id)
                parent = parent.parent
            data = {
                "run": _columns(run),
                "lineage": lineage,  # ancestors, nearest first
                "children": list(session.scalars(select(Run.id).where(Run.parent_run_id == run.id)
                                                 .order_by(Run.started_at, Run.id))),
                "input_model": _columns(run.input_model) if run.input_model else None,
                "output_model": _columns(run.output_model) if run.output_model else None,
                "concept_edits": [_columns(r) for r in run.concept_edits],
                "layer_edits": [_columns(r) for r in run.layer_edits],
                "probe_results": [_columns(r) for r in run.probe_results],
                "samples": [_columns(r) for r in run.samples],
                "gate_decisions": [_columns(r) for r in run.gate_decisions],
                "events": [_columns(e) for e in run.events],
            }
            return json_value(data)


def _insert_ignoring_duplicates(session: Session, model: type[Base], values: dict[str, Any],
                                unique_columns: tuple[str, ...]) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING; the new primary key, or None if the unique key already existed."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    table = model.__table__
    statement = (insert(table).values(**values).on_conflict_do_nothing(index_elements=list(unique_columns))
                 .returning(next(iter(table.primary_key.columns))))
    return session.execute(statement).scalar_one_or_none()
