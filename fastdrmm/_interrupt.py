"""Ctrl-C while the command line starts: one line and exit status 130, at once.

Standard library only, so that it can be installed before anything heavy is imported: a
KeyboardInterrupt raised inside an import (NumPy, Numba, scikit-learn take seconds to load)
would print a long traceback. Nothing has been written at that stage, so there is nothing to
keep.
"""

import os
import signal
import sys

MESSAGE = b"fastdrmm: interrupted\n"


def exit_interrupted(signum, frame):
    """A SIGINT handler: flush what was printed, write one line, exit 130."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    os.write(2, MESSAGE)
    os._exit(130)


def install():
    """Install :func:`exit_interrupted` for SIGINT; returns the previous handler (None where
    signals cannot be set: outside the main thread)."""
    try:
        return signal.signal(signal.SIGINT, exit_interrupted)
    except (ValueError, OSError):
        return None
