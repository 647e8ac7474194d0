"""The one lock helper (core.locking.FileLock): mutual exclusion across processes, bounded waits,
the owner named in refusals, locks of dead processes never stale. Every test runs twice: with the
kernel's lock (fcntl here), and as on a platform without fcntl (the module made unimportable in every
process of the test: lock files whose existence is the lock)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from coder_index.core import locking
from coder_index.core.locking import BusyError, FileLock

NO_FCNTL = str(Path(__file__).parent / "no_fcntl")  # a sitecustomize that makes fcntl unimportable


@pytest.fixture(params=["kernel", "file"], autouse=True)
def mode(request, monkeypatch):
    """Both lock mechanisms: this process and the ones the test starts use the same."""
    if request.param == "file":
        monkeypatch.setattr(locking, "KERNEL_LOCKS", False)
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [NO_FCNTL, os.environ.get("PYTHONPATH")])))
    else:
        assert locking.KERNEL_LOCKS
    return request.param


def file_stays(mode, remove):
    """Whether the lock file is left after a release: the kernel's lock keeps it unless remove=True;
    a lock file is the lock, so it always goes."""
    return mode == "kernel" and not remove

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
def test_writers_of_many_processes_never_overlap(tmp_path, remove, mode):
    counter = tmp_path / "n"
    counter.write_text("0")
    procs = [subprocess.Popen([sys.executable, "-c", COUNT, str(tmp_path / "lock"), str(counter), "150",
                               "1" if remove else "0"]) for _ in range(4)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    assert counter.read_text() == "600"
    assert (tmp_path / "lock").exists() == file_stays(mode, remove)


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


def test_a_killed_holder_leaves_no_lock(tmp_path, mode):
    for remove in (False, True):
        holder = hold(tmp_path / "lock", 60, remove)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        assert (tmp_path / "lock").exists()  # its file stays, naming it, but holds no lock
        with FileLock(tmp_path / "lock", "x", remove=remove) as lock:
            assert lock.held
        assert (tmp_path / "lock").exists() == file_stays(mode, remove)


def test_released_lock_names_no_stale_owner(tmp_path, mode):
    with FileLock(tmp_path / "lock", "x"):
        assert (tmp_path / "lock").read_text().startswith(f"pid {os.getpid()}")
    assert not (tmp_path / "lock").exists() if mode == "file" else (tmp_path / "lock").read_text() == ""


@pytest.mark.parametrize("mode", ["file"], indirect=True)  # lock files only: the kernel's lock needs no takeover
def test_without_fcntl_a_lock_file_of_no_live_process_is_taken_over(tmp_path, mode):
    """The lock files' own cases: a holder on another host is never judged dead from here; a file that
    names no owner is taken over once it is old; many waiters taking over one dead holder's lock
    still exclude each other (the counter test above, started on a dead holder's file)."""
    import socket

    lock = tmp_path / "lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(f"pid {dead.pid} on {socket.gethostname()}: coder-index classify\n")
    with FileLock(lock, "x") as held:
        assert held.held and f"pid {os.getpid()}" in lock.read_text()
    lock.write_text(f"pid {dead.pid} on another-host.example: coder-index classify\n")
    with pytest.raises(BusyError, match="another-host") as err:
        FileLock(lock, "x").acquire()
    assert f"delete {lock}" in str(err.value)  # the way out when that process is gone
    lock.write_text("")
    assert not FileLock(lock, "x").try_acquire()  # its creator may be writing its line right now
    old = time.time() - 60
    os.utime(lock, (old, old))
    assert FileLock(lock, "x").try_acquire()
    lock.unlink()
    lock.write_text(f"pid {dead.pid} on {socket.gethostname()}: coder-index classify\n")
    counter = tmp_path / "n"
    counter.write_text("0")
    procs = [subprocess.Popen([sys.executable, "-c", COUNT, str(lock), str(counter), "50", "0"]) for _ in range(4)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    assert counter.read_text() == "200" and not lock.exists()
