"""deepalign's error family: every error a user can cause derives from :class:`DeepalignError`.

The command line turns each of them into one line (``deepalign COMMAND: message``) and exit code 2.
The messages name what was wrong: the argument (``--lengths``), or the file and line
(``data.jsonl:3``), and what was expected.

* :class:`InputError`: a bad value or file content (also a ``ValueError``, so library callers that
  catch ``ValueError`` keep working);
* :class:`FileFormatError`: a file that cannot be read as the format it should be; the message starts
  with ``file:line`` (or ``file: byte N`` for an encoding error);
* :class:`SettingsMismatchError`: a rerun into an output that was made with other settings;
* :class:`EndpointError`: a judge endpoint that failed (unreachable, timed out, an error status, an
  answer that is not what the API promises).

Like the ``io`` module, this one imports nothing of deepalign and may be used by any layer.
"""

from __future__ import annotations


class DeepalignError(Exception):
    """An error the user can fix; its message is one line naming the argument or file."""


class InputError(DeepalignError, ValueError):
    """A bad argument value or file content."""


class FileFormatError(InputError):
    """A file that cannot be read; the message starts with ``file:line`` or ``file: byte N``."""


class SettingsMismatchError(DeepalignError):
    """A rerun whose settings differ from those the output was made with."""


class EndpointError(DeepalignError, RuntimeError):
    """A judge endpoint that failed: unreachable, timed out, an error status or a malformed answer."""


def check_int(name: str, value, *, minimum: int = 1) -> int:
    """``value`` when it is an int ≥ ``minimum`` (not a bool); else :class:`InputError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int ≥ {minimum}"
        raise InputError(f"{name} must be {kind}, got {value!r}")
    return value
