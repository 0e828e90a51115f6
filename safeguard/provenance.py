"""Who ran what, where, with which software: collected once per run, when the audit database records the run
(``Database.start_run``)."""
from __future__ import annotations

import getpass
import os
import platform
import socket
import sys
from importlib import metadata

# The distributions whose versions every run records (read from package metadata: nothing is imported).
RECORDED_DISTRIBUTIONS = ("torch", "diffusers", "transformers", "open_clip_torch", "safetensors", "sqlalchemy")


def collect_versions() -> dict:
    """Versions of safeguard, python, the ML libraries and every installed plugin distribution."""
    from . import __version__

    out = {"safeguard": __version__, "python": platform.python_version()}
    for dist in RECORDED_DISTRIBUTIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    out["plugins"] = {ep.name: f"{ep.dist.name} {ep.dist.version}" if ep.dist else None
                      for ep in metadata.entry_points(group="safeguard")}
    return out


def actor() -> dict:
    """``{"user", "host"}`` of this process; the user is the uid where the system has no name for it."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (containers)
        user = str(os.getuid()) if hasattr(os, "getuid") else None
    return {"user": user, "host": socket.gethostname()}


def argv() -> list[str]:
    return list(sys.argv)
