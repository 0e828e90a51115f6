"""The revert stage: undo the last edit of a model written by ``apply`` and record it as a run, with the hashes
of the model it read and the model it wrote."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class RevertOutcome:
    run_id: str
    out_dir: Path
    input_tree_sha256: str
    output_tree_sha256: str
    reverted_run_id: str | None  # the apply run whose edit was undone, as the edit record names it


def revert_model(model_dir: str | Path, out_dir: str | Path, *, db_url: str | None = None) -> RevertOutcome:
    """Write ``model_dir`` with its last edit undone to ``out_dir`` and record a "revert" run in the audit
    database: the input and output models by their file hashes, and the undone apply run as its parent when
    that run is in this database."""
    from .. import modelio
    from ..db import open_db
    from ..provenance import argv

    model_dir, out_dir = Path(model_dir).resolve(), Path(out_dir).resolve()
    record = modelio.read_edit_record(model_dir) or {}
    db = open_db(db_url)
    undone = record.get("run_id")
    parent = undone if undone and db.get_run(undone) is not None else None
    input_files = modelio.hash_model_folder(model_dir)
    input_model_id = db.record_model(str(model_dir), None, "input", input_files.files, input_files.tree_sha256)
    run_id = db.start_run(kind="revert", argv=argv(), parent_run_id=parent, input_model_id=input_model_id,
                          policy_name=record.get("policy"), policy_sha256=record.get("policy_sha256"))
    try:
        modelio.revert_pipeline(model_dir, out_dir)
        output_files = modelio.hash_model_folder(out_dir)
        with db.session() as s:
            output_model_id = db.record_model(str(out_dir), None, "output", output_files.files,
                                              output_files.tree_sha256, session=s)
            db.finish_run(run_id, "done", stats={"reverted_run_id": undone}, output_model_id=output_model_id,
                          session=s)
    except BaseException as exc:
        db.finish_run(run_id, "failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    return RevertOutcome(run_id, out_dir, input_files.tree_sha256, output_files.tree_sha256, undone)
