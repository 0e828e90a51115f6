"""The recorded runs a stage starts from: the finished apply run a probe needs, the latest probe run of an
apply run, the policy a run recorded and the folder a probe run keeps its images in."""
from __future__ import annotations

from pathlib import Path

from ..errors import AuditError
from ..policy import LoadedPolicy, parse_policy_text


def policy_of(run: dict) -> LoadedPolicy:
    """The policy exactly as the run recorded it (its text, parsed again)."""
    return parse_policy_text(run["policy_text"], run.get("policy_path") or "policy.yaml")


def recorded_run(db, run_id: str) -> dict:
    run = db.get_run(run_id)
    if run is None:
        raise AuditError(f"no run {run_id!r} in the audit database", field="RUN", fix="see 'safeguard runs list'")
    return run


def finished_apply_run(db, run_id: str) -> dict:
    """The apply run ``run_id`` names (itself, or the parent of a probe run); it must have finished."""
    run = recorded_run(db, run_id)
    if run["kind"] == "probe":
        run = db.get_run(run["parent_run_id"])
    if run["kind"] != "apply" or run["status"] != "done":
        raise AuditError(f"run {run['id']} is a {run['status']} {run['kind']} run; probes need a finished apply run",
                         field="RUN", fix="run 'safeguard apply' to completion first")
    return run


def latest_probe_run(db, run_id: str) -> dict:
    """The probe run ``run_id`` names: itself, or the latest probe run of an apply run."""
    run = recorded_run(db, run_id)
    if run["kind"] == "apply":
        children = [r for r in db.child_runs(run_id) if r["kind"] == "probe"]
        if not children:
            raise AuditError(f"apply run {run_id} has not been probed", field="RUN", fix=f"run 'safeguard probe {run_id}'")
        run = children[-1]
    elif run["kind"] != "probe":
        raise AuditError(f"run {run_id} is a {run['kind']} run, not an apply or probe run", field="RUN",
                         fix="pass the id of an apply or probe run (see 'safeguard runs list')")
    return run



def evidence_dir_for(db, loaded: LoadedPolicy) -> Path:
    """Where a new probe run of ``loaded`` writes its images: ``output.evidence_dir`` (relative to the policy
    file) when set, else the database's evidence folder."""
    chosen = loaded.policy.output.evidence_dir
    if chosen is None:
        return db.evidence_dir()
    folder = loaded.resolve(chosen, "output.evidence_dir")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def evidence_dir_of(db, probe_run: dict) -> Path:
    """Where a recorded probe run keeps its images: the folder in its stats (``evidence_dir``), else the
    database's evidence folder (runs recorded before the folder was)."""
    recorded = (probe_run.get("stats") or {}).get("evidence_dir")
    return Path(recorded) if recorded else db.evidence_dir()
