"""Time spent compiling kernels, and one line that says it is happening.

Numba compiles a kernel on its first call with a new signature (or loads it from its disk
cache); on a fresh machine that takes minutes, and without a word a run looks hung. A
:class:`CompileClock` listens to Numba's compile events while it is entered: it counts the
seconds of the outermost compiles (a kernel compiles the kernels it calls inside its own
compile) and, given ``say``, announces the first compile it sees, once per process.
"""

from __future__ import annotations

import time

MESSAGE = ("compiling the kernels (once per machine: Numba caches them on disk; "
           "a few minutes)...")


class CompileClock:
    """A context that counts compile seconds (``seconds``) and, where ``say`` (a callable
    taking one line) is given, says :data:`MESSAGE` at the first compile of the process."""

    announced = False  # process-wide: the line is said once

    def __init__(self, say=None):
        self.say = say
        self.seconds = 0.0
        self._depth = 0
        self._start = 0.0
        self._listener = None

    def __enter__(self):
        try:
            from numba.core import event
        except ImportError:  # no compile events to listen to: nothing is timed
            return self
        clock = self

        class Listener(event.Listener):
            def on_start(self, ev):
                clock._started()

            def on_end(self, ev):
                clock._ended()

        self._event = event
        self._listener = Listener()
        event.register("numba:compile", self._listener)
        return self

    def __exit__(self, *exc):
        if self._listener is not None:
            self._event.unregister("numba:compile", self._listener)
        return False

    def _started(self):
        if self._depth == 0:
            self._start = time.perf_counter()
            if self.say is not None and not CompileClock.announced:
                CompileClock.announced = True
                self.say(MESSAGE)
        self._depth += 1

    def _ended(self):
        self._depth -= 1
        if self._depth == 0:
            self.seconds += time.perf_counter() - self._start
