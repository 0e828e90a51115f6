"""The plugin manager: built-in plugins and setuptools entry points (group ``safeguard``) through one manager.

``SAFEGUARD_LOAD_PLUGINS`` restricts which third-party plugins load (comma-separated distribution or entry
point names; empty loads none). ``SAFEGUARD_PLUGINS_DIR`` names a folder whose ``*.py`` files load as
plugins (handy for one-file, in-house plugins). Built-ins always load. Nothing here imports torch.
"""
from __future__ import annotations

import importlib
import os
import sys

import pluggy

from . import hookspecs

DEFAULT_PLUGINS = (
    "safeguard.builtin.pure",
    "safeguard.builtin.retain_projection",
    "safeguard.builtin.uce",
    "safeguard.builtin.none",
    "safeguard.builtin.probes",
    "safeguard.builtin.collateral",
    "safeguard.builtin.judge_open_clip",
)

pm = pluggy.PluginManager("safeguard")
pm.add_hookspecs(hookspecs)

_loaded = False


def load_plugins() -> pluggy.PluginManager:
    global _loaded
    if _loaded:
        return pm
    _loaded = True
    for module_name in DEFAULT_PLUGINS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # a built-in not present in this build
        pm.register(module, name=module_name)
    if not hasattr(sys, "_called_from_test"):
        allowed = os.environ.get("SAFEGUARD_LOAD_PLUGINS")
        if allowed is None:
            pm.load_setuptools_entrypoints("safeguard")
        else:
            from importlib.metadata import entry_points

            names = {n.strip() for n in allowed.split(",") if n.strip()}
            for ep in entry_points(group="safeguard"):
                if ep.name in names or (ep.dist and ep.dist.name in names):
                    if pm.get_plugin(ep.name) is None:
                        pm.register(ep.load(), name=ep.name)
    plugins_dir = os.environ.get("SAFEGUARD_PLUGINS_DIR")
    if plugins_dir:
        _load_plugins_dir(plugins_dir)
    # Reject hook implementations whose names match no hookspec (a misspelled hook).
    pm.check_pending()
    return pm


def _load_plugins_dir(folder: str) -> None:
    import importlib.util
    from pathlib import Path

    for path in sorted(Path(folder).glob("*.py")):
        name = f"safeguard_plugins_dir.{path.stem}"
        if pm.get_plugin(name) is not None:
            continue
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        pm.register(module, name=name)


def _collect(hook_name: str) -> dict:
    found: dict = {}

    def register(cls):
        name = getattr(cls, "name", None)
        if not name:
            raise TypeError(f"{cls!r} registered through {hook_name} has no 'name' attribute")
        if name in found and found[name] is not cls:
            raise ValueError(f"two plugins register a {hook_name[9:-1]} named {name!r}")
        found[name] = cls

    getattr(load_plugins().hook, hook_name)(register=register)
    return found


def get_erasers() -> dict:
    return _collect("register_erasers")


def get_probes() -> dict:
    return _collect("register_probes")


def get_judges() -> dict:
    return _collect("register_judges")


def plugin_info(include_builtin: bool = True) -> list[dict]:
    """Name, version and hooks of every registered plugin, for ``safeguard plugins --json``."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    dist_of = {}
    for plugin, dist in load_plugins().list_plugin_distinfo():
        dist_of[plugin] = dist
    out = []
    for name, plugin in pm.list_name_plugin():
        builtin = name in DEFAULT_PLUGINS
        if builtin and not include_builtin:
            continue
        dist = dist_of.get(plugin)
        if dist is not None:
            ver = dist.version
        elif builtin:
            ver = __version__
        else:
            try:
                ver = version(name)
            except PackageNotFoundError:
                ver = None
        out.append({"name": name, "version": ver, "builtin": builtin,
                    "hooks": sorted(h.name for h in pm.get_hookcallers(plugin) or [])})
    return out
