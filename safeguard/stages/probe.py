"""The probe stage: render, judge and record the edited model of an apply run against its original, and turn
the recorded samples into one result per concept and probe."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..contracts import SCREEN_KIND, SCREEN_STATUSES, ScreenResult
from ..errors import AuditError, ModelError, PolicyError
from ..faults import crash_point
from ..policy import LoadedPolicy
from .runs import evidence_dir_for, evidence_dir_of, finished_apply_run, policy_of


@dataclass
class ProbeRun:
    run_id: str
    apply_run_id: str
    evidence_dir: Path


def probe_run(db, run_id: str, *, resume: bool = False, kinds: list[str] | None = None, echo=print) -> ProbeRun:
    """Probe the edited model of the apply run ``run_id`` and record every sample and result in ``db``; with
    ``resume``, ``run_id`` is a probe run to continue without redoing its recorded samples. ``kinds``: only
    these probes (default: the policy's ``probes.kinds``); ``echo`` hears progress."""
    from .. import modelio
    from ..plugins import get_judges, get_probes
    from ..probing import ProbeContext, image_similarity, rule_for, run_probe, summarise, verify_model_files
    from ..provenance import argv

    if resume:
        probe_row = db.get_run(run_id)
        if probe_row is None or probe_row["kind"] != "probe":
            raise AuditError(f"{run_id!r} is not a probe run", field="--resume", fix="pass the id of a probe run to resume")
        apply_run = finished_apply_run(db, probe_row["parent_run_id"])
        probe_id = run_id
        db.reopen_run(probe_id)
    else:
        apply_run = finished_apply_run(db, run_id)
        probe_id = None
    loaded = policy_of(apply_run)
    policy = loaded.policy
    models = {m["role"]: m for m in db.run_models(apply_run["id"])}
    verify_model_files(db, models["input"], "model.source")
    verify_model_files(db, models["output"], "output.dir")
    check_seeds_disjoint(apply_run, loaded)
    if probe_id is None:
        evidence_dir = evidence_dir_for(db, loaded)
        probe_id = db.start_run(kind="probe", policy=loaded, argv=argv(),
                                parent_run_id=apply_run["id"], seed=policy.probes.seed)
        db.update_run(probe_id, stats={"evidence_dir": str(evidence_dir)})  # where the report finds the images
    else:
        evidence_dir = evidence_dir_of(db, db.get_run(probe_id))
    crash_point("probe:after-run-row")
    try:
        probes = get_probes()
        judges = get_judges()
        if policy.judge.name not in judges:
            raise ModelError(f"unknown judge {policy.judge.name!r}", field="judge.name", fix=f"use one of: {', '.join(judges)}")
        t0 = time.perf_counter()
        from ..singlefile import is_single_file, source_and_config

        config = source_and_config(loaded)[1] if is_single_file(policy.model.source) else None
        original = modelio.load_pipeline(Path(models["input"]["path"]) if models["input"]["files"] else models["input"]["path"],
                                         config=config)
        edited = modelio.load_pipeline(Path(models["output"]["path"]))
        ctx = ProbeContext(loaded, original, edited, None, seed=policy.probes.seed,
                           edited_dir=Path(models["output"]["path"]))
        wanted = kinds or list(policy.probes.kinds)
        # Screen probes read the samples the rendering probes record, so they run last.
        screens = [k for k in wanted if getattr(probes.get(k), "kind", None) == SCREEN_KIND]
        wanted = [k for k in wanted if k not in screens]
        outcomes = []
        try:
            ctx.judge = judges[policy.judge.name](policy.judge.checkpoint, policy.judge.template, loaded.base_dir)
        except Exception as exc:  # no judge, no evidence: every probe is unassessed
            from ..probing import ProbeOutcome

            err = f"judge failed to load: {type(exc).__name__}: {exc}"[:1000]
            echo(f"  {err}")
            outcomes = [ProbeOutcome(c.name if c else "*", k, getattr(probes.get(k), "kind", "target"), "unassessed", err)
                        for k in wanted
                        for c in (policy.concepts if getattr(probes.get(k), "scope", "concept") == "concept" else [None])]
        if ctx.judge is not None:
            echo(f"probing {len(policy.concepts)} concept(s) with {', '.join(wanted + screens)} "
                 f"(models loaded in {time.perf_counter() - t0:.1f}s)")
            for kind in wanted:
                probe_cls = probes.get(kind)
                scope = getattr(probe_cls, "scope", "concept")
                for concept in (policy.concepts if scope == "concept" else [None]):
                    if probe_cls is None:
                        from ..probing import ProbeOutcome

                        outcomes.append(ProbeOutcome(concept.name, kind, "target", "unassessed",
                                                     f"no probe plugin named {kind!r} is installed"))
                        continue
                    outcomes.append(run_probe(ctx, db, probe_id, concept, probe_cls, evidence_dir, echo))
        crash_point("probe:before-results")
        from ..distributed import team

        if not team().lead(db):  # the other processes of a launch are done: the main one records the results
            return ProbeRun(probe_id, apply_run["id"], evidence_dir)
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
        judge_error = None if ctx.judge is not None else next((o.error for o in outcomes), "the judge failed to load")
        rows += [screen_row(ctx, probes[kind], samples, echo, judge_error) for kind in screens]
        db.replace_probe_results(probe_id, rows)
        db.finish_run(probe_id, "done", stats={"seconds": round(time.perf_counter() - t0, 2), **team().stats()})
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
        raise PolicyError(f"probe seeds {probes.seed}-{last - 1} overlap the eraser's capture seeds "
                          f"{capture.start}-{capture.stop - 1}", file=str(loaded.path), field="probes.seed",
                          fix=f"set probes.seed to {capture.stop} or more (or eraser.seed below {probes.seed - seeds})")


def screen_row(ctx, probe_cls, samples: list[dict], echo, judge_error: str | None = None) -> dict:
    """A screen probe's result row (concept "*", details kind "screen"): its status is its measured agreement
    with the judge; a screen that raises, or has no judged samples to read, is unassessed."""
    from ..plugins import registered_by

    judge = ctx.judge or _NoJudge()
    row = dict(concept="*", probe=probe_cls.name, hits=None, ci_low=None, ci_high=None, threshold=None,
               judge_name=judge.name, judge_version=judge.version, judge_sha256=judge.sha256)
    if judge_error is not None:
        result = ScreenResult("unassessed", error=judge_error)
    else:
        try:
            result = probe_cls().screen(ctx, samples)
            if not isinstance(result, ScreenResult) or result.status not in SCREEN_STATUSES:
                raise TypeError(f"screen() returned {result!r}, not a ScreenResult with a status of "
                                f"{', '.join(SCREEN_STATUSES)}")
        except Exception as exc:  # a failing screen is unassessed, never a pass
            plugin = registered_by(probe_cls) or probe_cls.__module__
            result = ScreenResult("unassessed", error=f"{type(exc).__name__} in plugin {plugin}: {exc}"[:1000])
    echo(f"  {probe_cls.name} screen: {result.status}, {result.note or result.error}")
    details = {**result.details, "kind": SCREEN_KIND}
    details.update({k: v for k, v in (("note", result.note), ("error", result.error)) if v is not None})
    return {**row, "status": result.status, "n": result.n, "rate": result.rate, "details": details}


class _NoJudge:
    name = version = sha256 = None
