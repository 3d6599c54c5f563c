"""The one error hierarchy. Only the CLI layer turns these into exit codes."""

from __future__ import annotations

import difflib
from typing import Iterable


class BitcpmError(Exception):
    """A problem the user can fix. `message` says what and where, `hint` says how."""

    def __init__(self, message: str, hint: str | None = None, problems: Iterable[str] = ()):
        super().__init__(message)
        self.message = message
        self.hint = hint
        # Validation reports every problem at once; `message` summarises, `problems` lists them.
        self.problems = list(problems)

    def __str__(self) -> str:
        return self.message


class InputError(BitcpmError):
    """Bad input: a missing, unreadable or corrupt file, or an argument that makes no sense."""


class ConfigError(BitcpmError):
    """An invalid configuration: quantization scheme, recipe, strategy file or config.json."""


class QuantError(BitcpmError):
    """A quantization scheme that cannot be applied to a given model or tensor."""


class DeviceError(BitcpmError):
    """A requested device is unavailable, or the device stack is broken."""


class CheckFailed(BitcpmError):
    """The check ran and found a problem (exit 1, not 2)."""


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' when something close exists, else ''."""
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def collect(problems: list[str], error_type: type[BitcpmError], summary: str, hint: str | None) -> None:
    """Raise one error listing every problem, if there are any."""
    if problems:
        head = problems[0] if len(problems) == 1 else f"{summary}: {len(problems)} problems"
        raise error_type(head, hint=hint, problems=problems if len(problems) > 1 else ())
