"""The library's typed errors (no host imports). Library code raises these; only `po_plugins.cli` turns them into
one line on stderr and an exit status (`po_plugins.cli._common.run`).

Every message is one line that names the fix.
"""

from __future__ import annotations

import difflib


class PoError(Exception):
    """Base of every po_plugins error a user can meet; its message is one line naming the fix."""


class OptionError(PoError, ValueError):
    """A plugin option or loss choice that cannot work."""


class HostError(PoError, RuntimeError):
    """The installed host framework cannot host the plugin (missing, unsupported version, or a seam is gone)."""


class DataError(PoError, ValueError):
    """A data file that cannot be used as given; the message names the file, the row and the column where known."""

    def __init__(self, message: str, file: str | None = None, row: int | None = None, column: str | None = None):
        parts = (f"file {file}" if file and str(file) not in message else "",
                 f"row {row}" if row is not None and f"row {row}" not in message else "",
                 f"column '{column}'" if column and f"'{column}'" not in message else "")
        where = ", ".join(p for p in parts if p)
        super().__init__(f"{message} ({where})" if where else message)
        self.file, self.row, self.column = file, row, column


class PluginStateError(PoError, ValueError):
    """A checkpoint's plugin state does not fit this run (another objective)."""


def nearest(name: str, choices) -> str:
    """' (did you mean X?)' for the closest valid name, or '' when none is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


__all__ = ["PoError", "OptionError", "HostError", "DataError", "PluginStateError", "nearest"]
