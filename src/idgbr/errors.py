"""User-facing errors.

Anything the user can fix (a bad file, a missing path, a typo in a config) raises :class:`IdgbrError` with a
one-line message that names the file and the fix. The CLI prints that line and exits non-zero; only ``--debug``
shows a traceback.
"""

from __future__ import annotations

from pathlib import Path


class IdgbrError(Exception):
    """An error caused by the user's input, with a one-line message that says how to fix it."""

    exit_code = 2


def file_error(path: str | Path, problem: str, fix: str = "") -> IdgbrError:
    """Build the standard one-line message ``<path>: <problem>[; <fix>]``."""
    message = f"{path}: {problem}"
    if fix:
        message += f"; {fix}"
    return IdgbrError(message)


def check_unknown_keys(given: dict, allowed, where: str) -> None:
    """Refuse unknown configuration keys (typos) and list the valid ones."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        import difflib

        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            if not close:  # e.g. 'lr_rate' -> 'lr', 'tile' -> 'tile_size': a key that extends or shortens a valid one
                related = [a for a in allowed if key.startswith(f"{a}_") or a.startswith(f"{key}_")]
                close = sorted(related, key=lambda a: (-len(set(a.split("_")) & set(key.split("_"))), len(a), a))[:1]
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise IdgbrError(f"{where}: unknown key(s) {', '.join(hints)}; valid keys: {', '.join(sorted(allowed))}")
