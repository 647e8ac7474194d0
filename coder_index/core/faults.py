"""Deterministic crash points, so that tests can kill a writer exactly where it matters.

``CODER_INDEX_CRASH_AT=<point>`` in a process's environment makes it SIGKILL itself when a writer
reaches that point (for example ``index.committed``: after the SQLite commit, before the rename);
``<point>#<n>`` at the n-th time it gets there. Unset, a crash point costs one comparison. The
points are listed where they are called.
"""

from __future__ import annotations

import os
import signal

_AT = os.environ.get("CODER_INDEX_CRASH_AT", "")
_AT_NAME, _, _AT_NTH = _AT.partition("#")
_reached = 0


def crash_point(name: str) -> None:
    global _reached
    if _AT and _AT_NAME == name:
        _reached += 1
        if _reached >= int(_AT_NTH or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def armed(name: str) -> bool:
    """Whether the process is set to crash at ``name`` (for points that must tear a write first)."""
    global _reached
    if not (_AT and _AT_NAME == name):
        return False
    _reached += 1  # each question is an arrival at the point
    return _reached >= int(_AT_NTH or 1)


_PAUSE = os.environ.get("CODER_INDEX_PAUSE_AT", "")


def pause_point(name: str) -> None:
    """``CODER_INDEX_PAUSE_AT=<point>:<seconds>`` sleeps there: tests widen a race window on purpose
    (two writers, one of them inside its critical section) instead of hoping to hit it."""
    if _PAUSE and _PAUSE.rsplit(":", 1)[0] == name:
        import time

        time.sleep(float(_PAUSE.rsplit(":", 1)[1]))


def crash_once(name: str) -> None:
    """``CODER_INDEX_CRASH_ONCE=<point>:<marker file>``: the first process to reach the point
    creates the marker and SIGKILLs itself; every later one (a restarted worker) passes. Read at
    call time, so that it reaches workers started with the driver's environment."""
    spec = os.environ.get("CODER_INDEX_CRASH_ONCE", "")
    if not spec or spec.split(":", 1)[0] != name:
        return
    try:
        fd = os.open(spec.split(":", 1)[1], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
