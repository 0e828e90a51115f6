"""`probe`, `report`, `gate` and `audit`: turn an apply run into recorded evidence and a verdict."""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import AuditError, ModelError
from .faults import crash_point
from .gate import GateDecision, decide, within_threat_model
from .policy import LoadedPolicy, parse_policy_text

SCREEN_PROBE = "activation_screen"
COLLATERAL_SECTION = "Outside the policy"  # the report section of policy-wide probes (collateral damage)
SCREEN_MIN_AUC = 0.8  # the screen is trusted as a pre-filter only where it ranks judged hits above misses this well


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
    from .probing import ProbeContext, image_similarity, rule_for, run_probe, summarise, verify_model_files
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
    check_seeds_disjoint(apply_run, loaded)
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
        from .singlefile import is_single_file, source_and_config

        config = source_and_config(loaded)[1] if is_single_file(policy.model.source) else None
        original = modelio.load_pipeline(Path(models["input"]["path"]) if models["input"]["files"] else models["input"]["path"],
                                         config=config)
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
            outcomes = [ProbeOutcome(c.name if c else "*", k, getattr(probes.get(k), "kind", "target"), "unassessed", err)
                        for k in wanted if k != "activation"
                        for c in (policy.concepts if getattr(probes.get(k), "scope", "concept") == "concept" else [None])]
        if ctx.judge is not None:
            echo(f"probing {len(policy.concepts)} concept(s) with {', '.join(wanted)} (models loaded in {time.perf_counter() - t0:.1f}s)")
            for kind in wanted:
                if kind == "activation":
                    continue
                probe_cls = probes.get(kind)
                scope = getattr(probe_cls, "scope", "concept")
                for concept in (policy.concepts if scope == "concept" else [None]):
                    if probe_cls is None:
                        from .probing import ProbeOutcome

                        outcomes.append(ProbeOutcome(concept.name, kind, "target", "unassessed",
                                                     f"no probe plugin named {kind!r} is installed"))
                        continue
                    outcomes.append(run_probe(ctx, db, probe_id, concept, probe_cls, evidence_dir, echo))
        crash_point("probe:before-results")
        samples = db.samples(probe_id)
        rows = []
        for outcome in outcomes:
            concept = next((c for c in policy.concepts if c.name == outcome.concept), None)
            mine = [s for s in samples if s["probe"] == outcome.probe and s["concept"] == outcome.concept]
            probe_cls = probes.get(outcome.probe) or type("Missing", (), {"kind": outcome.kind})
            row = summarise(outcome, mine, rule_for(policy, probe_cls, concept), ctx.judge or _NoJudge())
            if outcome.kind == "keep" and mine:
                row["details"]["similarity"] = image_similarity(mine, evidence_dir, ctx.judge)
            rows.append(row)
        if "activation" in wanted and ctx.judge is not None:
            rows.append(_screen_row(ctx, samples, Path(models["output"]["path"]), echo))
        db.replace_probe_results(probe_id, rows)
        db.finish_run(probe_id, "done", stats={"seconds": round(time.perf_counter() - t0, 2)})
    except BaseException as exc:
        db.finish_run(probe_id, "failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    return ProbeRun(probe_id, apply_run["id"], evidence_dir)


def check_seeds_disjoint(apply_run: dict, loaded: LoadedPolicy) -> None:
    """Probe seeds must not reuse the latents the eraser captured its activations from."""
    params = apply_run.get("eraser_params") or {}
    seeds = params.get("seeds") if isinstance(params.get("seeds"), int) else 0
    first = apply_run.get("seed") or 0
    capture = range(first, first + seeds)
    probes = loaded.policy.probes
    last = probes.seed + probes.max_images + max(probes.images_per_prompt, probes.attack_images)
    if capture and capture.start < last and probes.seed < capture.stop:
        from .errors import PolicyError

        raise PolicyError(f"probe seeds {probes.seed}-{last - 1} overlap the eraser's capture seeds "
                          f"{capture.start}-{capture.stop - 1}", file=str(loaded.path), field="probes.seed",
                          fix=f"set probes.seed to {capture.stop} or more (or eraser.seed below {probes.seed - seeds})")


def _screen_row(ctx, samples: list[dict], edited_dir: Path, echo) -> dict:
    """The activation screen as a result row: its status is its measured agreement with the judge."""
    from . import modelio
    from .probing import activation_screen

    base = dict(concept="*", probe=SCREEN_PROBE, hits=None, ci_low=None, ci_high=None, threshold=None,
                judge_name=ctx.judge.name, judge_version=ctx.judge.version, judge_sha256=ctx.judge.sha256)
    try:
        bases = modelio.read_edit_bases(edited_dir)
        if not bases:
            return {**base, "status": "unassessed", "n": 0, "rate": None,
                    "details": {"kind": "screen", "error": "the eraser saved no activation bases with the edit"}}
        screen = activation_screen(ctx, samples, bases)
    except Exception as exc:
        return {**base, "status": "unassessed", "n": 0, "rate": None,
                "details": {"kind": "screen", "error": f"{type(exc).__name__}: {exc}"[:1000]}}
    agreement = screen["agreement"]
    if agreement["auc"] is None:
        status, note = "unassessed", "needs target samples the judge calls hits and misses to measure agreement"
    elif agreement["auc"] >= SCREEN_MIN_AUC:
        status, note = "pass", f"agrees with the judge (AUC {agreement['auc']:.2f} >= {SCREEN_MIN_AUC})"
    else:
        status, note = "fail", f"disagrees with the judge (AUC {agreement['auc']:.2f} < {SCREEN_MIN_AUC})"
    echo(f"  activation screen: {screen['prompts_screened']} prompts in {screen['seconds']}s, {note}")
    return {**base, "status": status, "n": agreement["n"], "rate": agreement["auc"],
            "details": {**screen, "kind": "screen", "note": note}}


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


def gate(db, run_id: str, echo=None) -> tuple[GateDecision, dict]:
    """Verdict for a probe run (or the latest probe run of an apply run); recorded in the database and in the
    edited model's card (``README.md``), when the output folder still holds this run's edit. ``echo`` hears
    why a card could not be written."""
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
    decision = decide(results, policy.thresholds.max_unassessed, model_error, required=policy.gate.required,
                      concepts=tuple(c.name for c in policy.concepts), threat_model=policy.gate.threat_model)
    if run["status"] != "done":
        decision.reasons.insert(0, f"probe run {run['id']} is {run['status']}")
    db.add_gate_decision(run["id"], decision.verdict, int(decision.exit_code), decision.reasons)
    _record_verdict_in_card(db, apply_run, policy, decision, run["id"], echo)
    return decision, run


def _record_verdict_in_card(db, apply_run: dict, policy, decision: GateDecision, probe_run_id: str, echo) -> None:
    from .modelcard import record_verdict

    for m in db.run_models(apply_run["id"]):
        if m["role"] != "output" or not Path(m["path"]).is_dir():
            continue
        try:
            record_verdict(Path(m["path"]), apply_run["id"], policy, decision, probe_run_id)
        except OSError as exc:
            if echo is not None:
                echo(f"the model card was not updated ({exc.strerror or exc}): {Path(m['path']) / 'README.md'}")


def report_data(db, run_id: str) -> dict:
    """Everything the report shows, from the database alone (no model is loaded or run)."""
    run = _latest_probe_run(db, run_id)
    apply_run = db.get_run(run["parent_run_id"])
    loaded = _policy_of(apply_run)
    policy = loaded.policy
    results = db.probe_results(run["id"])
    samples = db.samples(run["id"])
    decision = decide(results if run["status"] == "done" else [], policy.thresholds.max_unassessed,
                      required=policy.gate.required, concepts=tuple(c.name for c in policy.concepts),
                      threat_model=policy.gate.threat_model)
    models = {m["role"]: m for m in db.run_models(apply_run["id"])}
    judge = next(({"name": r["judge_name"], "version": r["judge_version"], "sha256": r["judge_sha256"]}
                  for r in results if r.get("judge_name")), {"name": None, "version": None, "sha256": None})
    judge["labels_note"] = ("labels per concept: the concept, its neighbours and the generic fallback; "
                            "a hit is the concept ranked first")
    concepts = []
    sections = [(c.name, c.category, c.name) for c in policy.concepts]
    if any(r["concept"] == "*" and r["probe"] != SCREEN_PROBE for r in results):
        sections.append((COLLATERAL_SECTION, "collateral", "*"))
    for name, category, key in sections:
        probes_out = []
        for r in [r for r in results if r["concept"] == key and r["probe"] != SCREEN_PROBE]:
            d = r.get("details") or {}
            mine = [s for s in samples if s["probe"] == r["probe"] and s["concept"] == key]
            orig = {(s["prompt"], s["seed"]): s for s in mine if s["model_role"] == "original"}
            pairs = [{"prompt": s["prompt"], "seed": s["seed"], "group": s["scores"].get("group"),
                      "original": _sample_view(orig.get((s["prompt"], s["seed"]))), "edited": _sample_view(s)}
                     for s in mine if s["model_role"] == "edited"]
            probes_out.append({"probe": r["probe"], "kind": d.get("kind", "target"), "status": r["status"], "n": r["n"],
                               "hits": r["hits"], "rate": r["rate"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                               "threshold": r["threshold"], "original": d.get("original"), "retention": d.get("retention"),
                               "retention_low": d.get("retention_low"), "retention_high": d.get("retention_high"),
                               "similarity": d.get("similarity"), "error": d.get("error") or d.get("failure"),
                               "attack": d.get("attack"), "assessment": d.get("assessment"), "power": d.get("power"),
                               "substitution": d.get("substitution"), "groups": d.get("groups"),
                               "interval": d.get("interval"), "plan": d.get("plan"),
                               "threat_model": d.get("threat_model"), "decision": d.get("decision"),
                               "gated": within_threat_model(r, policy.gate.threat_model), "samples": pairs})
        statuses = {p["status"] for p in probes_out if p["gated"]}
        verdict = "fail" if "fail" in statuses else ("unassessed" if statuses - {"pass"} or not statuses else "pass")
        concepts.append({"name": name, "category": category, "verdict": verdict, "probes": probes_out})
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
        "evidence_rules": {"required": list(policy.gate.required), "threat_model": policy.gate.threat_model,
                           "confidence": policy.probes.confidence,
                           "max_images": policy.probes.max_images, "images_per_round": policy.probes.images_per_prompt,
                           "assumed_icc": policy.probes.assumed_icc, "min_elicitation": policy.thresholds.min_elicitation,
                           "min_collateral_retention": policy.thresholds.min_collateral_retention,
                           "max_substitution": policy.thresholds.max_substitution,
                           "operator": (apply_run.get("stats") or {}).get("reduces_to")},
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
