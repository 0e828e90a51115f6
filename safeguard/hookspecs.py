"""The plugin contract. Each hook receives a ``register`` callback (or the click group) and returns nothing."""
import pluggy

hookspec = pluggy.HookspecMarker("safeguard")


@hookspec
def register_erasers(register):
    """Register eraser classes: ``register(EraserClass)``."""


@hookspec
def register_probes(register):
    """Register probe classes: ``register(ProbeClass)``."""


@hookspec
def register_judges(register):
    """Register judge classes: ``register(JudgeClass)``."""


@hookspec
def register_commands(cli):
    """Add click commands to the ``safeguard`` command group."""
