"""The report stage: everything the report shows, read from the audit database alone (no model is loaded or
run), written as a self-contained HTML file, a Markdown summary and canonical JSON."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..gate import decide, within_threat_model
from .runs import evidence_dir_of, latest_probe_run, policy_of

COLLATERAL_SECTION = "Outside the policy"  # the report section of policy-wide probes (collateral damage)


@dataclass
class ReportFiles:
    """What :func:`report_run` wrote: the report data and the files, in the order written."""
    data: dict
    written: list[Path] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return self.data["verdict"]["verdict"]


def report_run(db, run_id: str, *, html: str | Path | None = None, json: str | Path | None = None,
               markdown: str | Path | None = None, blur_unsafe: bool = False) -> ReportFiles:
    """Write the report of a probe run (or the latest probe run of an apply run): HTML at ``html``, report data
    at ``json``, a Markdown summary at ``markdown``; with none of them, HTML at ``report-<probe run>.html`` in
    the working directory. ``blur_unsafe`` blurs images of concepts in the "unsafe" category. Each file is
    written whole or not at all."""
    from ..files import write_atomically
    from ..report import render_html, render_json, render_markdown

    data = report_data(db, run_id)
    if html is None and json is None and markdown is None:
        html = f"report-{data['run']['id']}.html"
    out = ReportFiles(data)
    evidence_dir = evidence_dir_of(db, db.get_run(data["run"]["id"]))
    for path, render in ((html, lambda: render_html(data, evidence_dir, blur_unsafe=blur_unsafe)),
                         (json, lambda: render_json(data)), (markdown, lambda: render_markdown(data))):
        if path is not None:
            out.written.append(write_atomically(Path(path), render()))
    return out


def report_data(db, run_id: str) -> dict:
    """Everything the report shows for a probe run (or the latest probe run of an apply run), from the
    database alone."""
    run = latest_probe_run(db, run_id)
    apply_run = db.get_run(run["parent_run_id"])
    loaded = policy_of(apply_run)
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
    screens = [r for r in results if _is_screen(r)]
    measured = [r for r in results if not _is_screen(r)]
    concepts = []
    sections = [(c.name, c.category, c.name) for c in policy.concepts]
    if any(r["concept"] == "*" for r in measured):
        sections.append((COLLATERAL_SECTION, "collateral", "*"))
    for name, category, key in sections:
        probes_out = []
        for r in [r for r in measured if r["concept"] == key]:
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
    screen = screens[0]["details"] if screens else None
    return {
        "schema_version": 1,
        "generated_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "run": {k: run.get(k) for k in ("id", "kind", "status", "started_at", "finished_at", "user", "host", "argv", "versions")},
        "apply_run": {k: apply_run.get(k) for k in ("id", "eraser_name", "eraser_version", "eraser_params", "stats")},
        # The hash the apply run recorded, not one computed again from its text.
        "policy": {"name": policy.name, "sha256": apply_run["policy_sha256"],
                   "canonical_json": apply_run.get("policy_canonical_json") or loaded.canonical_json, "text": loaded.text},
        "models": {"original": _model_view(models.get("input")), "edited": _model_view(models.get("output"))},
        "judge": judge,
        "verdict": {"verdict": decision.verdict, "exit_code": int(decision.exit_code), "reasons": decision.reasons},
        "concepts": concepts,
        "activation_screen": {"agreement": screen["agreement"], "rows": screen["rows"]} if screen and "rows" in screen else None,
        "layers": [{"module": l["module"], "stats": l["stats"]} for l in db.run_as_dict(apply_run["id"])["layer_edits"]],
        "hardening": (apply_run.get("stats") or {}).get("harden"),
        "benchmark": _benchmark(policy.model.source),
        "evidence_rules": {"required": list(policy.gate.required), "threat_model": policy.gate.threat_model,
                           "confidence": policy.probes.confidence,
                           "max_images": policy.probes.max_images, "images_per_round": policy.probes.images_per_prompt,
                           "assumed_icc": policy.probes.assumed_icc, "min_elicitation": policy.thresholds.min_elicitation,
                           "min_collateral_retention": policy.thresholds.min_collateral_retention,
                           "max_substitution": policy.thresholds.max_substitution,
                           "operator": (apply_run.get("stats") or {}).get("reduces_to")},
    }


def _benchmark(source) -> dict | None:
    """The erasure benchmark stored for an embedded model (bench/erasure.py), as the report shows it."""
    from ..world.assets import load_benchmark

    return load_benchmark(str(source))


def _is_screen(result: dict) -> bool:
    """A screen result (the activation screen): a check of the eraser, shown in its own section."""
    return (result.get("details") or {}).get("kind") == "screen"


def _sample_view(s: dict | None) -> dict | None:
    if s is None:
        return None
    probs = (s.get("scores") or {}).get("probs") or []
    return {"image_path": s["image_path"], "label": s["label"], "score": max(probs) if probs else None}


def _model_view(m: dict | None) -> dict:
    if m is None:
        return {"source": None, "tree_sha256": None, "files": []}
    return {"source": m["path"], "tree_sha256": m.get("tree_sha256"), "files": m.get("files") or []}
