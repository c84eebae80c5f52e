"""What every po_plugins command shares: the one place where the library's typed errors become one line on stderr
and an exit status."""

from __future__ import annotations

import contextlib
import sys

from po_plugins.errors import PoError

EXIT_USAGE = 2  # argparse's status for a bad command line; ours for any error the user can fix


@contextlib.contextmanager
def user_errors():
    """Turn a typed po_plugins error into `SystemExit("po_plugins: <message>")` (one line on stderr, status 1),
    the convention of every po_plugins CLI; other exceptions pass through with their traceback."""
    try:
        yield
    except PoError as e:
        raise SystemExit(f"po_plugins: {e}") from None


def run(main, argv=None):
    """Call `main(argv)` under `user_errors()`; returns what main returns."""
    with user_errors():
        return main(sys.argv[1:] if argv is None else argv)
