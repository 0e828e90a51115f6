"""Named crash points for the fault-injection tests: `SAFEGUARD_CRASH_AT=name` makes the process kill
itself with SIGKILL when it reaches that point, exactly as a power cut or the OOM killer would."""
from __future__ import annotations

import os
import signal

CRASH_POINTS = (
    "apply:after-run-row",       # the 'running' row is committed, nothing else yet
    "apply:after-load",          # model loaded, not edited
    "apply:after-edit",          # weights edited in memory, nothing written
    "write:after-save",          # temporary folder written, not renamed
    "write:after-move-old",      # an earlier output moved aside, new one not yet renamed into place
    "apply:after-rename",        # output in place, run not yet marked done
    "probe:after-run-row",
    "probe:mid-samples",         # some samples recorded
    "probe:before-results",      # all samples recorded, no results yet
)


def crash_point(name: str) -> None:
    if os.environ.get("SAFEGUARD_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
