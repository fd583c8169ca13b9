"""The exceptions cdft raises on purpose.

Every failure a user can cause or fix is one of these, so the CLI can print a single
clear line with the right exit code instead of a traceback.
"""

from __future__ import annotations


class CdftError(Exception):
    """A runtime failure the user can act on (exit code 1)."""

    exit_code = 1


class UsageError(CdftError):
    """Bad input: an unknown name, a bad option, an impossible combination (exit code 2)."""

    exit_code = 2


class UnknownComponent(UsageError):
    """A name no plugin provides; ``kind`` and ``name`` say which, so a caller can add what it
    knows (a checkpoint names the plugin it was made with) without reading the message."""

    def __init__(self, message: str, kind: str, name: str) -> None:
        super().__init__(message)
        self.kind, self.name = kind, name


class PluginError(CdftError):
    """A plugin failed to load or registered something invalid."""


class PluginUnavailable(Exception):
    """Raised by a plugin (at import or inside a hook) whose optional dependency is missing.

    Such a plugin is reported as *unavailable* with this message (which should say how
    to install what is missing), not as broken.
    """


class Interrupted(CdftError):
    """The run was stopped by SIGTERM (preemption, exit 143) or Ctrl-C (exit 130); it can be resumed."""

    def __init__(self, message: str, exit_code: int = 143) -> None:
        super().__init__(message)
        self.exit_code = exit_code
