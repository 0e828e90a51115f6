"""Errors users see: one line naming the file, the field and the fix."""
from __future__ import annotations


class SafeguardError(Exception):
    """Base class for expected, user-facing failures (the CLI prints them as one line, exit 1)."""

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None,
                 fix: str | None = None, line: int | None = None):
        self.message, self.file, self.field, self.fix, self.line = message, file, field, fix, line
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        field = f"{self.field}: " if self.field else ""
        fix = f" (fix: {self.fix})" if self.fix else ""
        return " ".join(f"{where}{field}{self.message}{fix}".split())


class PolicyError(SafeguardError):
    """The policy file is malformed or asks for something impossible."""


class ModelError(SafeguardError):
    """The model folder or a weight file is missing, corrupt, unsafe or not what was audited."""


class AuditError(SafeguardError):
    """The audit database cannot be used (newer schema, broken chain, missing run)."""


class PluginError(SafeguardError):
    """A plugin failed to import, does not meet its contract, or raised while registering."""
