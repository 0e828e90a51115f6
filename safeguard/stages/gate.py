"""The gate stage: decide a probed run's release verdict, record it in the database and in the edited model's
card, and (for CI) write it as JUnit XML."""
from __future__ import annotations

from pathlib import Path

from ..errors import ModelError
from ..gate import GateDecision, decide
from .runs import latest_probe_run, policy_of


def gate_run(db, run_id: str, *, junit: str | Path | None = None, echo=None) -> tuple[GateDecision, dict]:
    """Verdict for a probe run (or the latest probe run of an apply run); recorded in the database and in the
    edited model's card (``README.md``) when the output folder still holds this run's edit; ``junit`` also
    writes it as JUnit XML there. Returns the decision and the probe run. ``echo`` hears why a card could not
    be written."""
    from ..probing import verify_model_files

    run = latest_probe_run(db, run_id)
    apply_run = db.get_run(run["parent_run_id"])
    policy = policy_of(apply_run).policy
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
    if junit is not None:
        write_junit(db, decision, run["id"], junit)
    return decision, run


def write_junit(db, decision: GateDecision, probe_run_id: str, path: str | Path) -> Path:
    """The decision and the probe run's results as JUnit XML at ``path``, written whole or not at all."""
    from ..files import write_atomically
    from ..junit import junit_xml

    path = Path(path)
    write_atomically(path, junit_xml(decision, db.probe_results(probe_run_id), probe_run_id))
    return path


def _record_verdict_in_card(db, apply_run: dict, policy, decision: GateDecision, probe_run_id: str, echo) -> None:
    from ..modelcard import record_verdict

    for m in db.run_models(apply_run["id"]):
        if m["role"] != "output" or not Path(m["path"]).is_dir():
            continue
        try:
            record_verdict(Path(m["path"]), apply_run["id"], policy, decision, probe_run_id)
        except OSError as exc:
            if echo is not None:
                echo(f"the model card was not updated ({exc.strerror or exc}): {Path(m['path']) / 'README.md'}")
