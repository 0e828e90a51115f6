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
from .contracts import contract_gaps
from .errors import PluginError

DEFAULT_PLUGINS = (
    "safeguard.builtin.pure",
    "safeguard.builtin.retain_projection",
    "safeguard.builtin.uce",
    "safeguard.builtin.none",
    "safeguard.builtin.probes",
    "safeguard.builtin.collateral",
    "safeguard.builtin.activation",
    "safeguard.builtin.judge_open_clip",
)

pm = pluggy.PluginManager("safeguard")
pm.add_hookspecs(hookspecs)

_loaded = False
_CONTRACTS = {"register_erasers": "eraser", "register_probes": "probe", "register_judges": "judge"}
_registered_by: dict[type, str] = {}  # plugin class -> the name of the plugin that registered it
_distributions: dict[str, tuple[str, str] | None] = {}  # entry-point plugin name -> (distribution, version)


def load_plugins() -> pluggy.PluginManager:
    """Register the built-ins, the entry-point plugins and ``SAFEGUARD_PLUGINS_DIR`` once; a plugin that fails
    to import raises :class:`PluginError` naming it."""
    global _loaded
    if _loaded:
        return pm
    for module_name in DEFAULT_PLUGINS:
        if pm.get_plugin(module_name) is not None:
            continue
        # A missing or broken built-in is a broken install, never a plugin to skip silently.
        module = _import_plugin(module_name, lambda name=module_name: importlib.import_module(name),
                                fix="reinstall safeguard (pip install -e . in a checkout)")
        pm.register(module, name=module_name)
    if not hasattr(sys, "_called_from_test"):
        allowed = os.environ.get("SAFEGUARD_LOAD_PLUGINS")
        names = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
        for ep in _entry_points():
            if names is not None and ep.name not in names and not (ep.dist and ep.dist.name in names):
                continue
            if pm.get_plugin(ep.name) is None and not pm.is_blocked(ep.name):
                dist = f" (from {ep.dist.name} {ep.dist.version})" if ep.dist else ""
                plugin = _import_plugin(ep.name, ep.load, what=f"plugin {ep.name!r}{dist}",
                                        fix=f"fix or uninstall {ep.dist.name if ep.dist else ep.value}, or leave "
                                            "it out with SAFEGUARD_LOAD_PLUGINS")
                pm.register(plugin, name=ep.name)
                _distributions[ep.name] = (ep.dist.name, ep.dist.version) if ep.dist else None
    plugins_dir = os.environ.get("SAFEGUARD_PLUGINS_DIR")
    if plugins_dir:
        _load_plugins_dir(plugins_dir)
    # Reject hook implementations whose names match no hookspec (a misspelled hook).
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(str(exc), fix="rename the function to one of the hooks in safeguard/hookspecs.py") from None
    _loaded = True
    return pm


def _entry_points():
    from importlib.metadata import entry_points

    return sorted(entry_points(group="safeguard"), key=lambda ep: ep.name)


def _import_plugin(name: str, load, *, fix: str, what: str | None = None):
    try:
        return load()
    except Exception as exc:
        raise PluginError(f"{what or f'built-in plugin {name}'} failed to import: {_one_line(exc)}", fix=fix) from exc


def _load_plugins_dir(folder: str) -> None:
    import importlib.util
    from pathlib import Path

    for path in sorted(Path(folder).glob("*.py")):
        name = f"safeguard_plugins_dir.{path.stem}"
        if pm.get_plugin(name) is not None:
            continue
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        _import_plugin(name, lambda: spec.loader.exec_module(module), what=f"plugin file {path}",
                       fix="fix the file or remove it from SAFEGUARD_PLUGINS_DIR")
        pm.register(module, name=name)


def call_hook(hook_name: str, **kwargs) -> None:
    """Call every implementation of a hook, one plugin at a time, so that an exception is reported as a
    :class:`PluginError` naming the plugin that raised it (its traceback is the error's cause)."""
    for impl in reversed(getattr(load_plugins().hook, hook_name).get_hookimpls()):
        try:
            impl.function(**{name: kwargs[name] for name in impl.argnames})
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin {impl.plugin_name!r} raised in {hook_name}: {_one_line(exc)}",
                              fix=f"fix or uninstall {impl.plugin_name}; --debug shows the traceback") from exc


def _collect(hook_name: str) -> dict:
    """The classes registered through ``hook_name``, by name, each checked against its contract."""
    found: dict = {}
    contract = _CONTRACTS[hook_name]
    for impl in reversed(getattr(load_plugins().hook, hook_name).get_hookimpls()):
        plugin = impl.plugin_name

        def register(cls, plugin=plugin):
            gaps = contract_gaps(contract, cls)
            if gaps:
                shown = getattr(cls, "__qualname__", repr(cls))
                raise PluginError(f"plugin {plugin!r} registers {contract} {shown}, which lacks "
                                  f"{'; '.join(gaps)}",
                                  fix=f"implement the {contract.capitalize()} contract of safeguard/contracts.py "
                                      "(docs/plugins.md)")
            name = cls.name
            if name in found and found[name] is not cls:
                first, second = sorted([_registered_by.get(found[name], "?"), plugin])
                article = "an" if contract[0] in "aeiou" else "a"
                raise PluginError(f"plugins {first!r} and {second!r} both register {article} {contract} named {name!r}",
                                  fix="uninstall one of them, or leave one out with SAFEGUARD_LOAD_PLUGINS")
            found[name] = cls
            _registered_by[cls] = plugin

        try:
            impl.function(register=register)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin {plugin!r} raised in {hook_name}: {_one_line(exc)}",
                              fix=f"fix or uninstall {plugin}; --debug shows the traceback") from exc
    return found


def registered_by(cls: type) -> str | None:
    """The name of the plugin that registered ``cls`` (a built-in's module name), or None if unknown."""
    return _registered_by.get(cls)


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


def get_erasers() -> dict:
    return _collect("register_erasers")


def get_probes() -> dict:
    return _collect("register_probes")


def get_judges() -> dict:
    return _collect("register_judges")


def plugin_info(include_builtin: bool = True) -> list[dict]:
    """Name, version, hooks and (for entry-point plugins) distribution of every registered plugin, for
    ``safeguard plugins --json``."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    out = []
    for name, plugin in load_plugins().list_name_plugin():
        builtin = name in DEFAULT_PLUGINS
        if builtin and not include_builtin:
            continue
        dist = _distributions.get(name)
        if name in _distributions:
            ver = dist[1] if dist else None
        elif builtin:
            ver = __version__
        else:
            try:
                ver = version(name)
            except PackageNotFoundError:
                ver = None
        out.append({"name": name, "version": ver, "builtin": builtin,
                    "hooks": sorted(h.name for h in pm.get_hookcallers(plugin) or []),
                    "distribution": dist[0] if dist else None})
    return out
