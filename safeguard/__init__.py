"""safeguard: erase banned concepts from text-to-image models, prove it, record it, gate on it."""
import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("safeguard")

from .contracts import (ConceptRequest, EraseRequest, EraseResult, Eraser, Judge, LayerEdit,  # noqa: E402
                        Probe, ProbeCase, ProbeCases, ProbeContext, ScreenProbe, ScreenResult)

# The stage functions (safeguard.stages), imported on first use so that `import safeguard` stays light.
_STAGE_FUNCTIONS = ("apply_policy", "probe_run", "report_data", "report_run", "gate_run", "audit_policy")

__all__ = ["__version__", "hookimpl", "ConceptRequest", "EraseRequest", "EraseResult", "Eraser", "Judge",
           "LayerEdit", "Probe", "ProbeCase", "ProbeCases", "ProbeContext", "ScreenProbe", "ScreenResult",
           *_STAGE_FUNCTIONS]


def __getattr__(name: str):
    if name in _STAGE_FUNCTIONS:
        from . import stages

        return getattr(stages, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
