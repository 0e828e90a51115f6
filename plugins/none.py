"""The "none" eraser: changes nothing. Applying it records the unedited model as the candidate, so its
baseline leakage can be probed, reported and gated exactly like an edited model's."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from safeguard import hookimpl
from safeguard.contracts import EraseRequest, EraseResult


class NoEditEraser:
    """Leaves the pipeline as it is."""
    name = "none"
    version = "1"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def erase(self, pipe, request: EraseRequest, params: Params) -> EraseResult:
        return EraseResult(layers=[], originals={}, stats={"seconds": 0.0, "note": "no edit"})


@hookimpl
def register_erasers(register):
    register(NoEditEraser)
