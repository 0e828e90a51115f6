"""Who ran what, where, with which software: captured once per run for the audit record."""
from __future__ import annotations

import getpass
import platform
import socket
import sys
from importlib.metadata import PackageNotFoundError, version


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("safeguard", "torch", "diffusers", "transformers", "open_clip_torch", "safetensors", "sqlalchemy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def actor() -> dict:
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = "unknown"
    return {"user": user, "host": socket.gethostname()}


def argv() -> list[str]:
    return list(sys.argv)
