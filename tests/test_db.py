"""The audit database API: run life cycle, models, evidence, idempotent samples, atomic writes, reading back.

The ``check_*`` functions take an open ``Database`` so tests/test_postgres.py runs the same checks on PostgreSQL.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from safeguard.integrity import verify_chain
from safeguard.db import (AuditEvent, ConceptEdit, Database, Run, Sample, canonical_json, json_value, new_id, open_db,
                          tree_sha256)
from safeguard.errors import AuditError

FILES = [{"path": "unet/diffusion_pytorch_model.safetensors", "sha256": "ab" * 32, "size": 1234},
         {"path": "model_index.json", "sha256": "CD" * 32, "size": 56}]


@pytest.fixture
def db(tmp_path):
    database = open_db(f"sqlite:///{tmp_path / 'audit.db'}")
    yield database
    database.close()


def count(db: Database, model) -> int:
    with db.read_session() as session:
        return session.scalar(select(func.count()).select_from(model))


def events(db: Database) -> list[str]:
    return [e["event"] for e in db.list_events()]


# --- checks shared with PostgreSQL ---------------------------------------------------------------------------------

def check_run_life_cycle(db: Database) -> None:
    original = db.record_model("/models/sd", "main", "input", FILES)
    run_id = db.start_run("apply", policy_name="brand-safety", policy_sha256="11" * 32, policy_text="name: x\n",
                          policy_canonical_json='{"name":"x"}', input_model_id=original, eraser_name="uce",
                          eraser_version="1.0", eraser_params={"lambda": 0.5, "preserve": ["dog"]}, seed=1234,
                          argv=["safeguard", "apply", "policy.yaml"])
    running = db.get_run(run_id)
    assert (running["status"], running["kind"], running["finished_at"], running["pid"]) == (
        "running", "apply", None, os.getpid())
    assert running["versions"]["safeguard"] and running["versions"]["python"] and running["user"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", running["started_at"])

    db.add_concept_edits(run_id, [
        {"concept": "pikachu", "category": "character", "forget_prompts": ["pikachu", "a photo of pikachu"],
         "retain_prompts": ["mario"], "stats": {"rows": 2}},
        {"concept": "monet", "category": "style", "forget_prompts": ["by monet"], "retain_prompts": []}])
    db.add_layer_edits(run_id, [{"module": "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
                                 "stats": {"rank": 3, "delta_norm": 0.25, "seconds": 0.01}}])
    edited = db.record_model("/out/sd-edited", None, "output", FILES[:1])
    db.add_probe_result(run_id, probe="canonical", concept="pikachu", status="pass", n=20, hits=1, ci_low=0.0,
                        ci_high=0.24, threshold=0.3, details={"seeds": [0, 1]}, judge_name="open_clip",
                        judge_version="3.3.0", judge_sha256="ef" * 32)
    db.finish_run(run_id, "done", stats={"seconds": 12.5}, output_model_id=edited)
    db.add_gate_decision(run_id, "pass", 0, ["all probes under threshold"])  # the gate judges finished runs

    done = db.get_run(run_id)
    assert (done["status"], done["error"], done["output_model_id"]) == ("done", None, edited)
    assert done["finished_at"] >= done["started_at"]
    assert done["stats"] == {"seconds": 12.5}

    record = db.run_as_dict(run_id)
    assert json.loads(json.dumps(record)) == record
    assert record["run"]["id"] == run_id and record["run"]["policy_name"] == "brand-safety"
    assert record["input_model"]["path"] == "/models/sd" and record["output_model"]["role"] == "output"
    assert [(m["role"], m["id"]) for m in db.run_models(run_id)] == [("input", original), ("output", edited)]
    assert [c["concept"] for c in record["concept_edits"]] == ["pikachu", "monet"]
    assert record["concept_edits"][1]["stats"] is None
    assert record["layer_edits"][0]["stats"]["rank"] == 3
    assert record["probe_results"][0]["rate"] == pytest.approx(0.05)
    assert record["gate_decisions"][0]["verdict"] == "pass"
    assert record["run"]["eraser_params"] == {"lambda": 0.5, "preserve": ["dog"]}
    assert [e["event"] for e in record["events"]] == [
        "run.started", "concept_edits.added", "layer_edits.added", "probe_result.added", "run.finished",
        "gate_decision.added"]
    assert db.probe_results(run_id) == record["probe_results"] and db.gate_decisions(run_id) == record["gate_decisions"]
    assert verify_chain(db).ok

    with pytest.raises(AuditError, match="already finished"):
        db.finish_run(run_id, "failed")
    with pytest.raises(AuditError, match="already finished"):
        db.add_sample(run_id, probe="canonical", concept="pikachu", model_role="edited", prompt="p", seed=0)


def check_failed_run(db: Database) -> None:
    parent = db.start_run("apply")
    db.finish_run(parent, "done")
    run_id = db.start_run("probe", parent_run_id=parent)
    db.add_probe_result(run_id, probe="paraphrase", concept="cat", status="unassessed", n=0, hits=0)
    db.finish_run(run_id, "failed", error="RuntimeError: CUDA out of memory", stats={"completed": 3})
    run = db.get_run(run_id)
    assert (run["status"], run["error"], run["stats"], run["parent_run_id"]) == (
        "failed", "RuntimeError: CUDA out of memory", {"completed": 3}, parent)
    record = db.run_as_dict(run_id)
    assert record["lineage"] == [parent] and record["probe_results"][0]["rate"] is None
    assert db.run_as_dict(parent)["children"] == [run_id]
    assert [r["id"] for r in db.child_runs(parent)] == [run_id]
    assert db.list_runs(status="failed")[0]["id"] == run_id
    assert verify_chain(db).ok


def check_sample_idempotency(db: Database) -> None:
    run_id = db.start_run("probe")
    sample = dict(probe="canonical", concept="pikachu", model_role="edited", prompt="a photo of pikachu", seed=7,
                  image_path="runs/x/0007.png", image_sha256="aa" * 32, scores={"pikachu": 0.91}, label="pikachu")
    assert db.add_sample(run_id, **sample) is True
    assert db.add_sample(run_id, **{**sample, "label": "other"}) is False  # a resumed probe: the first record stands
    assert db.add_sample(run_id, **{**sample, "model_role": "original"}) is True
    batch = [{**sample, "seed": seed} for seed in range(5, 10)]  # seed 7 is already there
    assert db.add_samples(run_id, batch) == 4
    assert db.add_samples(run_id, batch) == 0
    assert db.recorded_sample_keys(run_id) == (
        {("canonical", "pikachu", "edited", "a photo of pikachu", s) for s in range(5, 10)}
        | {("canonical", "pikachu", "original", "a photo of pikachu", 7)})
    with db.read_session() as session:
        labels = session.scalars(select(Sample.label).where(Sample.seed == 7, Sample.model_role == "edited")).all()
    assert labels == ["pikachu"]
    assert events(db).count("samples.added") == 3  # no event for writes that recorded nothing
    assert verify_chain(db).ok


def check_model_records(db: Database) -> None:
    first = db.record_model("/models/sd", "abc123", "input", FILES)
    again = db.record_model(Path("/models/sd"), "abc123", "output", list(reversed(FILES)))  # order does not matter
    elsewhere = db.record_model("/copy/sd", files=FILES)
    hub = db.record_model("org/model", "main", "input")  # known by name only: no files
    assert first == again != elsewhere != hub
    record = db.run_as_dict(db.start_run("audit", input_model_id=first))["input_model"]
    assert record["role"] == "input"  # the role it was first recorded in
    assert [f["path"] for f in record["files"]] == sorted(f["path"] for f in FILES)
    assert record["files"][0]["sha256"] == "cd" * 32  # hashes are stored lower-case
    assert record["tree_sha256"] == tree_sha256(FILES) == tree_sha256(reversed(FILES))
    assert events(db).count("model.recorded") == 3
    # One tree hash: a caller's (modelio's, over the folder) must be the one the database computes.
    given = db.record_model("/models/x", None, "input", FILES, tree_sha256(FILES))
    assert db.run_as_dict(db.start_run("audit", input_model_id=given))["input_model"]["tree_sha256"] == tree_sha256(FILES)
    with pytest.raises(ValueError, match="is not the hash of the file list"):
        db.record_model("/models/y", None, "input", FILES, "f" * 64)


def check_atomic_writes(db: Database) -> None:
    run_id = db.start_run("apply")
    before = events(db)
    with pytest.raises(TypeError, match=r"concept_edits\[1\]\.stats"):
        db.add_concept_edits(run_id, [{"concept": "a"}, {"concept": "b", "stats": {"bad": object()}}])
    with pytest.raises(Exception):  # the second row repeats the unique (run, concept): the whole batch rolls back
        db.add_concept_edits(run_id, [{"concept": "c"}, {"concept": "c"}])
    assert count(db, ConceptEdit) == 0 and events(db) == before
    with pytest.raises(RuntimeError):
        with db.session() as session:
            session.add(Run(kind="audit", status="running", started_at="x", argv=[], versions={}))
            session.flush()
            raise RuntimeError("crash mid-transaction")
    assert [r["id"] for r in db.list_runs()] == [run_id]
    assert verify_chain(db).ok


def check_one_transaction_for_several_writes(db: Database) -> None:
    run_id = db.start_run("apply")
    with pytest.raises(RuntimeError):
        with db.session() as session:  # as `apply` records its output: all of it or nothing
            output = db.record_model("/out", None, "output", FILES, session=session)
            db.add_concept_edits(run_id, [{"concept": "cat"}], session=session)
            db.add_layer_edits(run_id, [{"module": "attn2"}], session=session)
            db.finish_run(run_id, "done", output_model_id=output, session=session)
            raise RuntimeError("disk full while writing the record")
    assert db.get_run(run_id)["status"] == "running" and events(db) == ["run.started"]
    with db.session() as session:
        output = db.record_model("/out", None, "output", FILES, session=session)
        db.add_concept_edits(run_id, [{"concept": "cat"}], session=session)
        db.finish_run(run_id, "done", output_model_id=output, session=session)
    assert db.get_run(run_id)["output_model_id"] == output
    assert events(db) == ["run.started", "model.recorded", "concept_edits.added", "run.finished"]
    assert verify_chain(db).ok


def check_resume_and_replace_probe_results(db: Database) -> None:
    run_id = db.start_run("probe")
    sample = dict(probe="canonical", concept="cat", model_role="edited", prompt="a cat", seed=0)
    db.add_sample(run_id, **sample)
    db.replace_probe_results(run_id, [dict(probe="canonical", concept="cat", status="fail", n=1, hits=1)])
    db.finish_run(run_id, "failed", error="KeyboardInterrupt")
    db.reopen_run(run_id)
    assert (db.get_run(run_id)["status"], db.get_run(run_id)["error"]) == ("running", None)
    assert db.add_sample(run_id, **sample) is False and db.add_sample(run_id, **{**sample, "seed": 1}) is True
    rows = [dict(probe="canonical", concept="cat", status="pass", n=2, hits=0, details={"seeds": [0, 1]}),
            dict(probe="activation_screen", concept="*", status="unassessed", n=0, hits=None)]
    db.replace_probe_results(run_id, rows)
    db.finish_run(run_id, "done")
    results = db.probe_results(run_id)
    assert [(r["probe"], r["status"], r["hits"], r["rate"]) for r in results] == [
        ("canonical", "pass", 0, 0.0), ("activation_screen", "unassessed", None, None)]
    assert [s["seed"] for s in db.samples(run_id)] == [0, 1]
    with pytest.raises(AuditError, match="is done; there is nothing to resume"):
        db.reopen_run(run_id)
    assert verify_chain(db).ok


# --- SQLite --------------------------------------------------------------------------------------------------------

# The same checks run on PostgreSQL in test_postgres.py.
DB_CHECKS = (check_run_life_cycle, check_failed_run, check_sample_idempotency, check_model_records,
             check_atomic_writes, check_one_transaction_for_several_writes, check_resume_and_replace_probe_results)


@pytest.mark.parametrize("check", DB_CHECKS, ids=lambda check: check.__name__.removeprefix("check_"))
def test_shared_database_check(db, check):
    check(db)


def test_evidence_folder(db, tmp_path, monkeypatch):
    assert db.evidence_dir() == tmp_path / "evidence" and (tmp_path / "evidence").is_dir()
    monkeypatch.chdir(tmp_path)
    with open_db("sqlite://") as memory:
        assert memory.evidence_dir() == tmp_path / ".safeguard" / "evidence"


def test_running_row_is_visible_before_the_run_ends(db, tmp_path):
    run_id = db.start_run("apply")
    other = open_db(f"sqlite:///{tmp_path / 'audit.db'}")  # as another process would see it
    try:
        assert other.get_run(run_id)["status"] == "running"
    finally:
        other.close()


def test_crashed_run_is_marked_failed(tmp_path):
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    script = ("import os, sys; from safeguard.db import open_db; "
              "print(open_db(sys.argv[1]).start_run('apply')); sys.stdout.flush(); os._exit(1)")
    crashed = subprocess.run([sys.executable, "-c", script, url], capture_output=True, text=True, check=False)
    assert crashed.returncode == 1, crashed.stderr
    crashed_id = crashed.stdout.strip()
    with open_db(url) as db:
        alive = db.start_run("probe")  # this process is alive, so its run is not stale
        assert db.mark_stale_running_runs_failed() == [crashed_id]
        run = db.get_run(crashed_id)
        assert (run["status"], run["error"]) == ("failed", "interrupted: its process is gone")
        assert db.get_run(alive)["status"] == "running"
        assert db.mark_stale_running_runs_failed(older_than=timedelta(0)) == [alive]
        assert verify_chain(db).ok


def test_update_run(db):
    model = db.record_model("/m", files=FILES)
    run_id = db.start_run("apply")
    db.update_run(run_id, input_model_id=model, seed=9, stats={"a": 1})
    db.update_run(run_id, stats={"b": 2})
    run = db.get_run(run_id)
    assert (run["input_model_id"], run["seed"], run["stats"]) == (model, 9, {"a": 1, "b": 2})
    with pytest.raises(ValueError, match="cannot update status"):
        db.update_run(run_id, status="done")
    with pytest.raises(AuditError, match="model NOPE is not in the audit database"):
        db.update_run(run_id, output_model_id="NOPE")
    assert verify_chain(db).ok


def test_unknown_references_are_refused(db):
    with pytest.raises(AuditError, match="parent run 01NOPE is not in the audit database"):
        db.start_run("apply", parent_run_id="01NOPE")
    with pytest.raises(AuditError, match="run 01NOPE is not in the audit database"):
        db.add_gate_decision("01NOPE", verdict="pass", exit_code=0)
    with pytest.raises(ValueError, match="run kind"):
        db.start_run("deploy")
    with pytest.raises(ValueError, match="status must be one of pass, fail, unassessed"):
        db.add_probe_result(db.start_run("probe"), probe="p", concept="c", status="ok", n=1, hits=0)
    assert db.list_runs()[0]["kind"] == "probe" and len(db.list_runs()) == 1


def test_get_run_by_prefix(db):
    first, second = db.start_run("apply"), db.start_run("probe")
    assert db.get_run(second[:20].lower())["id"] == second
    with pytest.raises(AuditError, match="matches more than one run"):
        db.get_run(first[:6])
    with pytest.raises(AuditError, match="run None is not in the audit database"):
        db.get_run(None)
    assert [r["id"] for r in db.list_runs()] == [second, first]
    assert [r["id"] for r in db.list_runs(1)] == [second]
    assert [r["id"] for r in db.list_runs(kind="apply")] == [first]
    assert json.loads(json.dumps(db.list_runs())) == db.list_runs()


def test_policy_object_fills_the_policy_fields(db):
    class Loaded:  # the attributes safeguard.policy.LoadedPolicy has
        policy = type("P", (), {"name": "brand-safety"})()
        text, sha256, canonical_json = "name: brand-safety\n", "22" * 32, '{"name":"brand-safety"}'

    run = db.get_run(db.start_run("apply", policy=Loaded(), user="ci", host="runner-7"))
    assert (run["user"], run["host"]) == ("ci", "runner-7")
    assert (run["policy_name"], run["policy_text"], run["policy_sha256"], run["policy_canonical_json"]) == (
        "brand-safety", "name: brand-safety\n", "22" * 32, '{"name":"brand-safety"}')


def test_json_values_survive_the_round_trip(db):
    import numpy as np

    run_id = db.start_run("apply")
    stats = {"nan": float("nan"), "inf": -math.inf, "np": np.float32(0.5), "arr": np.arange(3), "tuple": (1, 2),
             1: "int key", "path": Path("/x"), "text": "café ✓"}
    db.finish_run(run_id, "done", stats=stats)
    assert db.get_run(run_id)["stats"] == {"nan": "NaN", "inf": "-Infinity", "np": 0.5, "arr": [0, 1, 2],
                                        "tuple": [1, 2], "1": "int key", "path": "/x", "text": "café ✓"}
    assert verify_chain(db).ok


def test_json_columns_hold_objects_or_arrays(db):
    run_id = db.start_run("probe")
    with pytest.raises(TypeError, match=r"samples\[0\]\.scores: must be a JSON object or array"):
        db.add_sample(run_id, probe="p", concept="c", model_role="edited", prompt="x", seed=0, scores=1.0)
    with pytest.raises(TypeError, match="payload: must be a JSON object or array"):
        db.record_event("bare number", 1.0)
    assert db.recorded_sample_keys(run_id) == set() and db.head()[0] == 1


def test_default_location(tmp_path, monkeypatch):
    monkeypatch.delenv("SAFEGUARD_DB", raising=False)
    monkeypatch.chdir(tmp_path)
    with open_db() as db:
        db.start_run("audit")
    assert (tmp_path / ".safeguard" / "audit.db").is_file()
    monkeypatch.setenv("SAFEGUARD_DB", f"sqlite:///{tmp_path / 'elsewhere' / 'x.db'}")
    with open_db() as db:
        assert db.list_runs() == []
    assert (tmp_path / "elsewhere" / "x.db").is_file()


def test_in_memory_database():
    with open_db("sqlite://") as db:
        check_sample_idempotency(db)


def test_not_a_database_is_refused(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(AuditError, match=r"junk\.db: cannot open the audit database: file is not a database"):
        open_db(f"sqlite:///{junk}")


def test_unsupported_backend_is_refused():
    with pytest.raises(AuditError, match="unsupported database 'mysql'"):
        open_db("mysql://localhost/x")


def test_free_standing_events_cannot_claim_records(db):
    with pytest.raises(ValueError, match="records"):
        db.record_event("note", {"records": {}})
    seq = db.record_event("policy.override", {"threshold": 0.2, "by": "ci"})
    assert db.head()[0] == seq == 1
    with db.read_session() as session:
        assert session.get(AuditEvent, seq).payload == {"by": "ci", "threshold": 0.2}


def test_ids_sort_by_creation_and_are_unique():
    ids = [new_id() for _ in range(2000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", i) for i in ids)


json_data = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12)


@settings(max_examples=60, deadline=None)
@given(json_data)
def test_canonical_json_is_stable(value):
    text = canonical_json(value)
    assert canonical_json(json.loads(text)) == text  # parsing and re-serialising changes nothing
    assert text == json.dumps(json_value(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
