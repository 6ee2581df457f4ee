"""The root of every user-facing error: the CLI prints its message on one line and exits non-zero,
the server turns it into a 4xx. Anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """A mistake in what the user gave (a path, a name, a config value), not a bug."""

    def __str__(self) -> str:  # KeyError and friends quote their message; users want it plain
        return str(self.args[0]) if self.args else self.__class__.__name__


class ResumeError(UserError, RuntimeError):
    """Nothing to resume, or the output folder belongs to another kind of run (local, Ray, search)."""
