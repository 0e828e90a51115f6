"""The stages of the data flow, one module each, as plain functions the CLI and ``bench/`` both call.

- apply (:mod:`safeguard.engine`): ``apply_policy(loaded)`` erases the policy's concepts and records an apply run
- probe (:mod:`.probe`): ``probe_run(db, run_id)`` measures leakage of an apply run and records a probe run
- report (:mod:`.report`): ``report_data(db, run_id)`` and ``report_run(db, run_id, html=...)`` write the report
- gate (:mod:`.gate`): ``gate_run(db, run_id)`` records the release verdict of a probe run
- audit (:mod:`.audit`): ``audit_policy(loaded)`` runs the four in one go

``runs`` holds the lookups they share. Nothing here imports torch until a stage runs.
"""
from __future__ import annotations

import importlib

_STAGES = {"apply_policy": "safeguard.engine", "probe_run": "safeguard.stages.probe",
           "report_data": "safeguard.stages.report", "report_run": "safeguard.stages.report",
           "gate_run": "safeguard.stages.gate", "audit_policy": "safeguard.stages.audit"}

__all__ = sorted(_STAGES)


def __getattr__(name: str):
    if name in _STAGES:
        return getattr(importlib.import_module(_STAGES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
