"""The one-shot pipeline behind ``safeguard audit POLICY``: apply the policy, probe the edited model, decide
the gate's verdict and write the report, each stage recorded in the audit database as it would be on its own."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..policy import LoadedPolicy

if TYPE_CHECKING:
    from ..engine import ApplyOutcome
    from ..gate import GateDecision
    from .probe import ProbeRun
    from .report import ReportFiles


@dataclass
class AuditOutcome:
    applied: ApplyOutcome
    probed: ProbeRun
    decision: GateDecision
    report: ReportFiles

    @property
    def html_report(self) -> Path:
        return self.report.written[0]


def default_report_path(loaded: LoadedPolicy) -> Path:
    """``report-<policy name>.html`` beside the policy's output folder, relative to the policy file."""
    path = Path(loaded.policy.output.dir).parent / f"report-{loaded.policy.name}.html"
    # resolve(): a policy in a subfolder names its output with ".."; print and record the plain path.
    return (path if path.is_absolute() else loaded.base_dir / path).resolve()


def audit_policy(loaded: LoadedPolicy, *, db_url: str | None = None, out_dir: str | None = None,
                 report_path: str | Path | None = None, blur_unsafe: bool = False, junit: str | Path | None = None,
                 lora: bool | None = None, single_file: bool | None = None, echo=print) -> AuditOutcome | None:
    """Apply ``loaded``, probe the result, record the gate's verdict (and write it as JUnit XML at ``junit``)
    and write the HTML report at ``report_path`` (default :func:`default_report_path`) with its Markdown
    summary beside it (``.md``). ``echo`` hears every stage's progress. Under a multi-process launch only the
    main process returns the outcome; the others return None after probing."""
    from ..db import open_db
    from ..engine import apply_policy
    from .gate import gate_run
    from .probe import probe_run
    from .report import report_run

    from ..distributed import team

    launch = team()  # under `accelerate launch` the main process applies and the processes share the probes
    applied = launch.on_main(lambda: apply_policy(loaded, out_dir=out_dir, db_url=db_url, lora=lora,
                                                  single_file=single_file, echo=echo), "apply")
    db = launch.open_db(db_url) if launch.size > 1 else open_db(db_url)
    probed = probe_run(db, applied.run_id, echo=echo)
    if not launch.is_main:
        return None  # the main process decides and reports
    decision, _ = gate_run(db, probed.run_id, junit=junit, echo=echo)
    html = Path(report_path) if report_path is not None else default_report_path(loaded)
    report = report_run(db, probed.run_id, html=html, markdown=html.with_suffix(".md"), blur_unsafe=blur_unsafe)
    return AuditOutcome(applied, probed, decision, report)
