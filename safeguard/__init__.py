"""safeguard: erase banned concepts from text-to-image models, prove it, record it, gate on it."""
import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("safeguard")

from .contracts import (ConceptRequest, EraseRequest, EraseResult, Eraser, Judge, LayerEdit,  # noqa: E402
                        Probe, ProbeCase, ProbeCases, ProbeContext)

__all__ = ["__version__", "hookimpl", "ConceptRequest", "EraseRequest", "EraseResult", "Eraser", "Judge",
           "LayerEdit", "Probe", "ProbeCase", "ProbeCases", "ProbeContext"]
