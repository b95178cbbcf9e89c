"""User-facing errors.

A ``UserError`` is a problem with the user's input (a path, a flag, a corrupt artifact). Its message is
one sentence that says what is wrong and what to do; the CLI prints it and exits with code 2. Any other
exception is a bug in llmcomp.
"""


class UserError(Exception):
    """Bad input: the message is shown to the user as-is."""


class FieldError(UserError):
    """A config field of the wrong type (or NaN), raised as ``Owner.field must be …``; ``field`` and ``tail`` (``must
    be …``) let a command line name the flag the field came from instead (``cli.app.run``)."""

    def __init__(self, owner: str, field: str, tail: str):
        super().__init__(f"{owner}.{field} {tail}")
        self.field, self.tail = field, tail


def require_int(name: str, value, low: int, where: str = "") -> None:
    """UserError unless ``value`` is an integer (not a bool, not 32.0) of at least ``low``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise UserError(f"{where}{name} must be an integer ≥ {low}, got {value!r}.")
