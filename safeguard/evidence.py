"""`probe`, `report`, `gate` and `audit`: turn an apply run into recorded evidence and a verdict."""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import AuditError, ModelError
from .faults import crash_point
from .gate import GateDecision, decide
from .policy import LoadedPolicy, parse_policy_text

SCREEN_PROBE = "activation_screen"


@dataclass
class ProbeRun:
    run_id: str
    apply_run_id: str
    evidence_dir: Path


def evidence_root(db) -> Path:
    """Images live beside the database (SQLite) or under .safeguard/evidence (other databases)."""
    return db.evidence_dir()


def _policy_of(run: dict) -> LoadedPolicy:
    return parse_policy_text(run["policy_text"], run.get("policy_path") or "policy.yaml")


def _apply_run(db, run_id: str) -> dict:
    run = db.get_run(run_id)
    if run is None:
        raise AuditError(f"no run {run_id!r} in the audit database", field="RUN", fix="see 'safeguard runs list'")
    if run["kind"] == "probe":
        run = db.get_run(run["parent_run_id"])
    if run["kind"] != "apply" or run["status"] != "done":
        raise AuditError(f"run {run['id']} is a {run['status']} {run['kind']} run; probes need a finished apply run",
                         field="RUN", fix="run 'safeguard apply' to completion first")
    return run


def probe(db, run_id: str, *, resume: bool = False, kinds: list[str] | None = None, echo=print) -> ProbeRun:
    """Probe the edited model of an apply run (or continue a probe run with resume=True)."""
    from . import modelio
    from .plugins import get_judges, get_probes
    from .probing import ProbeContext, activation_screen, image_similarity, run_probe, summarise, verify_model_files
    from .provenance import actor, argv, package_versions

    if resume:
        probe_row = db.get_run(run_id)
        if probe_row is None or probe_row["kind"] != "probe":
            raise AuditError(f"{run_id!r} is not a probe run", field="--resume", fix="pass the id of a probe run to resume")
        apply_run = _apply_run(db, probe_row["parent_run_id"])
        probe_id = run_id
        db.reopen_run(probe_id)
    else:
        apply_run = _apply_run(db, run_id)
        probe_id = None
    loaded = _policy_of(apply_run)
    policy = loaded.policy
    models = {m["role"]: m for m in db.run_models(apply_run["id"])}
    verify_model_files(db, models["input"], "model.source")
    verify_model_files(db, models["output"], "output.dir")
    if probe_id is None:
        probe_id = db.start_run(kind="probe", policy=loaded, argv=argv(), versions=package_versions(), **actor(),
                                parent_run_id=apply_run["id"], seed=policy.probes.seed)
    evidence_dir = evidence_root(db)
    crash_point("probe:after-run-row")
    try:
        probes = get_probes()
        judges = get_judges()
        if policy.judge.name not in judges:
            raise ModelError(f"unknown judge {policy.judge.name!r}", field="judge.name", fix=f"use one of: {', '.join(judges)}")
        t0 = time.perf_counter()
        original = modelio.load_pipeline(Path(models["input"]["path"]) if models["input"]["files"] else models["input"]["path"])
        edited = modelio.load_pipeline(Path(models["output"]["path"]))
        ctx = ProbeContext(loaded, original, edited, None, seed=policy.probes.seed)
        wanted = kinds or list(policy.probes.kinds)
        outcomes = []
        try:
            ctx.judge = judges[policy.judge.name](policy.judge.checkpoint, policy.judge.template, loaded.base_dir)
        except Exception as exc:  # no judge, no evidence: every probe is unassessed
            from .probing import ProbeOutcome

            err = f"judge failed to load: {type(exc).__name__}: {exc}"[:1000]
            echo(f"  {err}")
            outcomes = [ProbeOutcome(c.name, k, getattr(probes.get(k), "kind", "target"), "unassessed", err)
                        for c in policy.concepts for k in wanted if k != "activation"]
        if ctx.judge is not None:
            echo(f"probing {len(policy.concepts)} concept(s) with {', '.join(wanted)} (models loaded in {time.perf_counter() - t0:.1f}s)")
            for concept in policy.concepts:
                for kind in wanted:
                    if kind == "activation":
                        continue
                    if kind not in probes:
                        from .probing import ProbeOutcome

                        outcomes.append(ProbeOutcome(concept.name, kind, "target", "unassessed",
                                                     f"no probe plugin named {kind!r} is installed"))
                        continue
                    outcomes.append(run_probe(ctx, db, probe_id, concept, probes[kind], evidence_dir, echo))
        crash_point("probe:before-results")
        samples = db.samples(probe_id)
        rows = []
        for outcome in outcomes:
            concept = next(c for c in policy.concepts if c.name == outcome.concept)
            mine = [s for s in samples if s["probe"] == outcome.probe and s["concept"] == outcome.concept]
            row = summarise(outcome, mine, policy.thresholds_for(concept), ctx.judge or _NoJudge())
            if outcome.kind == "keep" and row["status"] != "unassessed":
                row["details"]["similarity"] = image_similarity(mine, evidence_dir, ctx.judge)
            rows.append(row)
        if "activation" in wanted and ctx.judge is not None:
            try:
                screen = activation_screen(ctx, samples)
                rows.append(dict(concept="*", probe=SCREEN_PROBE, status="pass" if screen["rows"] else "unassessed",
                                 n=len(screen["rows"]), hits=None, rate=screen["agreement"]["auc"], ci_low=None, ci_high=None,
                                 threshold=None, details={**screen, "kind": "screen"}, judge_name=ctx.judge.name,
                                 judge_version=ctx.judge.version, judge_sha256=ctx.judge.sha256))
                echo(f"  activation screen: {screen['prompts_screened']} prompts in {screen['seconds']}s, AUC vs judge {screen['agreement']['auc']}")
            except Exception as exc:
                rows.append(dict(concept="*", probe=SCREEN_PROBE, status="unassessed", n=0, hits=None, rate=None, ci_low=None,
                                 ci_high=None, threshold=None, details={"kind": "screen", "error": f"{type(exc).__name__}: {exc}"},
                                 judge_name=None, judge_version=None, judge_sha256=None))
        db.replace_probe_results(probe_id, rows)
        db.finish_run(probe_id, "done", stats={"seconds": round(time.perf_counter() - t0, 2)})
    except BaseException as exc:
        db.finish_run(probe_id, "failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    return ProbeRun(probe_id, apply_run["id"], evidence_dir)


class _NoJudge:
    name = version = sha256 = None


def _latest_probe_run(db, run_id: str) -> dict:
    run = db.get_run(run_id)
    if run is None:
        raise AuditError(f"no run {run_id!r} in the audit database", field="RUN", fix="see 'safeguard runs list'")
    if run["kind"] == "apply":
        children = [r for r in db.child_runs(run_id) if r["kind"] == "probe"]
        if not children:
            raise AuditError(f"apply run {run_id} has not been probed", field="RUN", fix=f"run 'safeguard probe {run_id}'")
        run = children[-1]
    return run


def gate(db, run_id: str) -> tuple[GateDecision, dict]:
    """Verdict for a probe run (or the latest probe run of an apply run); recorded in the database."""
    from .probing import verify_model_files

    run = _latest_probe_run(db, run_id)
    apply_run = db.get_run(run["parent_run_id"])
    policy = _policy_of(apply_run).policy
    results = db.probe_results(run["id"]) if run["status"] == "done" else []
    model_error = None
    try:
        for m in db.run_models(apply_run["id"]):
            if m["role"] == "output":
                verify_model_files(db, m, "output.dir")
    except ModelError as exc:
        model_error = exc.one_line()
    decision = decide(results, policy.thresholds.max_unassessed, model_error)
    if run["status"] != "done":
        decision.reasons.insert(0, f"probe run {run['id']} is {run['status']}")
    db.add_gate_decision(run["id"], decision.verdict, int(decision.exit_code), decision.reasons)
    return decision, run


def report_data(db, run_id: str) -> dict:
    """Everything the report shows, from the database alone (no model is loaded or run)."""
    run = _latest_probe_run(db, run_id)
    apply_run = db.get_run(run["parent_run_id"])
    loaded = _policy_of(apply_run)
    policy = loaded.policy
    results = db.probe_results(run["id"])
    samples = db.samples(run["id"])
    decision = decide(results if run["status"] == "done" else [], policy.thresholds.max_unassessed)
    models = {m["role"]: m for m in db.run_models(apply_run["id"])}
    judge = next(({"name": r["judge_name"], "version": r["judge_version"], "sha256": r["judge_sha256"]}
                  for r in results if r.get("judge_name")), {"name": None, "version": None, "sha256": None})
    judge["labels_note"] = ("labels per concept: the concept, its neighbours and the generic fallback; "
                            "a hit is the concept ranked first")
    concepts = []
    for c in policy.concepts:
        probes_out = []
        for r in [r for r in results if r["concept"] == c.name]:
            d = r.get("details") or {}
            mine = [s for s in samples if s["probe"] == r["probe"] and s["concept"] == c.name]
            orig = {(s["prompt"], s["seed"]): s for s in mine if s["model_role"] == "original"}
            pairs = [{"prompt": s["prompt"], "seed": s["seed"],
                      "original": _sample_view(orig.get((s["prompt"], s["seed"]))), "edited": _sample_view(s)}
                     for s in mine if s["model_role"] == "edited"]
            probes_out.append({"probe": r["probe"], "kind": d.get("kind", "target"), "status": r["status"], "n": r["n"],
                               "hits": r["hits"], "rate": r["rate"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                               "threshold": r["threshold"], "original": d.get("original"), "retention": d.get("retention"),
                               "similarity": d.get("similarity"), "error": d.get("error"), "attack": d.get("attack"),
                               "samples": pairs})
        statuses = {p["status"] for p in probes_out}
        verdict = "fail" if "fail" in statuses else ("unassessed" if statuses - {"pass"} or not statuses else "pass")
        concepts.append({"name": c.name, "category": c.category, "verdict": verdict, "probes": probes_out})
    screen = next((r["details"] for r in results if r["probe"] == SCREEN_PROBE), None)
    return {
        "schema_version": 1,
        "generated_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "run": {k: run.get(k) for k in ("id", "kind", "status", "started_at", "finished_at", "user", "host", "argv", "versions")},
        "apply_run": {k: apply_run.get(k) for k in ("id", "eraser_name", "eraser_version", "eraser_params", "stats")},
        "policy": {"name": policy.name, "sha256": loaded.sha256, "canonical_json": loaded.canonical_json, "text": loaded.text},
        "models": {"original": _model_view(models.get("input")), "edited": _model_view(models.get("output"))},
        "judge": judge,
        "verdict": {"verdict": decision.verdict, "exit_code": int(decision.exit_code), "reasons": decision.reasons},
        "concepts": concepts,
        "activation_screen": {"agreement": screen["agreement"], "rows": screen["rows"]} if screen and "rows" in screen else None,
        "layers": [{"module": l["module"], "stats": l["stats"]} for l in db.run_as_dict(apply_run["id"])["layer_edits"]],
    }


def _sample_view(s: dict | None) -> dict | None:
    if s is None:
        return None
    probs = (s.get("scores") or {}).get("probs") or []
    return {"image_path": s["image_path"], "label": s["label"], "score": max(probs) if probs else None}


def _model_view(m: dict | None) -> dict:
    if m is None:
        return {"source": None, "tree_sha256": None, "files": []}
    return {"source": m["path"], "tree_sha256": m.get("tree_sha256"), "files": m.get("files") or []}
