"""The "none" eraser: changes nothing. Applying it records the unedited model as the candidate, so its
baseline leakage can be probed, reported and gated exactly like an edited model's."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from safeguard import hookimpl


class NoEditEraser:
    name = "none"
    version = "1"
    kind = "weights"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def erase(self, pipe, request, params):
        from safeguard.erasers import EraseResult

        return EraseResult(layers=[], originals={}, stats={"seconds": 0.0, "note": "no edit"})


@hookimpl
def register_erasers(register):
    register(NoEditEraser)
