"""Deterministic fault hooks, so that tests can kill or pause a writer exactly where it matters.

The hooks are inert in every process that is not part of a test run: they act only when
``CODER_INDEX_TEST_RUN`` names the run (the test suite's conftest sets it to an id of its own), so
a ``CODER_INDEX_CRASH_AT`` left in a user's environment, or forwarded by Ray to its workers, can
never make a real run kill itself. Inert, a hook costs one comparison.

* ``CODER_INDEX_CRASH_AT=<point>`` makes the process SIGKILL itself when a writer reaches that point
  (for example ``index.committed``: after the SQLite commit, before the rename); ``<point>#<n>`` at
  the n-th time it gets there. The points are listed where ``crash_point`` is called.
* ``CODER_INDEX_PAUSE_AT=<point>:<seconds>`` sleeps there (a race window widened on purpose).
* ``CODER_INDEX_CRASH_ONCE=<point>:<marker file>``: the first process to reach the point creates the
  marker and SIGKILLs itself; every later one (a restarted worker) passes.

docs/CONTRIBUTING.md describes them.
"""

from __future__ import annotations

import os
import signal

TEST_RUN = "CODER_INDEX_TEST_RUN"


def _test_run() -> bool:
    return bool(os.environ.get(TEST_RUN, "").strip())


def _hook(name: str) -> str:
    return os.environ.get(name, "") if _test_run() else ""


_AT = _hook("CODER_INDEX_CRASH_AT")
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


_PAUSE = _hook("CODER_INDEX_PAUSE_AT")


def pause_point(name: str) -> None:
    """Sleep at ``name`` when ``CODER_INDEX_PAUSE_AT`` says so (in a test run only)."""
    if _PAUSE and _PAUSE.rsplit(":", 1)[0] == name:
        import time

        time.sleep(float(_PAUSE.rsplit(":", 1)[1]))


def crash_once(name: str) -> None:
    """SIGKILL the first process that reaches ``name`` (``CODER_INDEX_CRASH_ONCE``, in a test run only).
    Read at call time, so that it reaches workers started with the driver's environment."""
    spec = _hook("CODER_INDEX_CRASH_ONCE")
    if not spec or spec.split(":", 1)[0] != name:
        return
    try:
        fd = os.open(spec.split(":", 1)[1], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def hook_variables() -> dict[str, str]:
    """The hook settings of a test run, for workers started elsewhere (Ray); nothing outside a test run."""
    if not _test_run():
        return {}
    return {k: v for k, v in os.environ.items()
            if k == TEST_RUN or k in ("CODER_INDEX_CRASH_AT", "CODER_INDEX_PAUSE_AT", "CODER_INDEX_CRASH_ONCE")}
