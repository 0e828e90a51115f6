"""The hooks a plugin implements (with ``@safeguard.hookimpl``); each returns nothing.

The classes a hook registers must meet their contract in :mod:`safeguard.contracts`; ``docs/plugins.md``
documents every hook with an example.
"""
import pluggy

hookspec = pluggy.HookspecMarker("safeguard")


@hookspec
def register_erasers(register):
    """Register eraser classes: ``register`` (callable) takes one class meeting ``contracts.Eraser``."""


@hookspec
def register_probes(register):
    """Register probe classes: ``register`` (callable) takes one class meeting ``contracts.Probe``."""


@hookspec
def register_judges(register):
    """Register judge classes: ``register`` (callable) takes one class meeting ``contracts.Judge``."""


@hookspec
def register_commands(cli):
    """Add commands to ``cli`` (the ``safeguard`` click group), e.g. with ``@cli.command()``."""
