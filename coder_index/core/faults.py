"""Deterministic crash points, so that tests can kill a writer exactly where it matters.

``CODER_INDEX_CRASH_AT=<point>`` in a process's environment makes it SIGKILL itself when a writer
reaches that point (for example ``index.committed``: after the SQLite commit, before the rename).
Unset, a crash point costs one comparison. The points are listed where they are called.
"""

from __future__ import annotations

import os
import signal

_AT = os.environ.get("CODER_INDEX_CRASH_AT", "")


def crash_point(name: str) -> None:
    if _AT and _AT == name:
        os.kill(os.getpid(), signal.SIGKILL)


def armed(name: str) -> bool:
    """Whether the process is set to crash at ``name`` (for points that must tear a write first)."""
    return bool(_AT) and _AT == name


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
