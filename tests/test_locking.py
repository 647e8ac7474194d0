"""The one lock helper (core.locking.FileLock): mutual exclusion across processes, bounded waits,
the owner named in refusals, locks of dead processes never stale."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from coder_index.core.locking import BusyError, FileLock

HOLD = textwrap.dedent("""
    import sys, time
    from coder_index.core.locking import FileLock
    lock = FileLock(sys.argv[1], "the thing", remove=sys.argv[3] == "1").acquire()
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    lock.release()
""")

COUNT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from coder_index.core.locking import FileLock
    counter = Path(sys.argv[2])
    for _ in range(int(sys.argv[3])):
        with FileLock(sys.argv[1], "the counter", wait=60, remove=sys.argv[4] == "1"):
            n = int(counter.read_text() or 0)   # read, then write: lost updates if two overlap
            counter.write_text(str(n + 1))
""")


def hold(path, seconds, remove=False):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds), "1" if remove else "0"],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.mark.parametrize("remove", [False, True])
def test_writers_of_many_processes_never_overlap(tmp_path, remove):
    counter = tmp_path / "n"
    counter.write_text("0")
    procs = [subprocess.Popen([sys.executable, "-c", COUNT, str(tmp_path / "lock"), str(counter), "150",
                               "1" if remove else "0"]) for _ in range(4)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    assert counter.read_text() == "600"
    assert (tmp_path / "lock").exists() != remove


def test_refused_at_once_naming_the_owner(tmp_path):
    holder = hold(tmp_path / "lock", 30)
    try:
        t0 = time.monotonic()
        with pytest.raises(BusyError) as err:
            FileLock(tmp_path / "lock", "--out x.csv").acquire()
        assert time.monotonic() - t0 < 2
        assert f"pid {holder.pid}" in str(err.value) and "--out x.csv is in use" in str(err.value)
        assert not FileLock(tmp_path / "lock", "x").try_acquire()
    finally:
        holder.kill()
        holder.wait()


def test_a_bounded_wait_then_a_refusal_or_the_lock(tmp_path):
    holder = hold(tmp_path / "lock", 30)
    try:
        t0 = time.monotonic()
        with pytest.raises(BusyError) as err:
            FileLock(tmp_path / "lock", "the index idx", wait=1.0).acquire()
        waited = time.monotonic() - t0
        assert 0.9 <= waited < 10 and "waited 1 s" in str(err.value) and f"pid {holder.pid}" in str(err.value)
    finally:
        holder.kill()
        holder.wait()
    short = hold(tmp_path / "lock", 0.5)  # finishes within the wait: the waiter gets the lock
    lock = FileLock(tmp_path / "lock", "x", wait=30).acquire()
    assert lock.held and f"pid {os.getpid()}" in (tmp_path / "lock").read_text()
    lock.release()
    short.wait()


def test_a_killed_holder_leaves_no_lock(tmp_path):
    for remove in (False, True):
        holder = hold(tmp_path / "lock", 60, remove)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        assert (tmp_path / "lock").exists()  # its file stays, naming it, but holds no lock
        with FileLock(tmp_path / "lock", "x", remove=remove) as lock:
            assert lock.held
        assert (tmp_path / "lock").exists() != remove


def test_released_lock_names_no_stale_owner(tmp_path):
    with FileLock(tmp_path / "lock", "x"):
        assert (tmp_path / "lock").read_text().startswith(f"pid {os.getpid()}")
    assert (tmp_path / "lock").read_text() == ""
