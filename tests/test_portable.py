"""Portability: the CPU main job where fcntl and fork do not exist (Windows has neither; macOS spawns
its workers), run in fresh processes with ``fcntl`` made unimportable and ``os.fork`` removed
(``tests/no_fcntl/sitecustomize.py``): the same rows as the kernel-lock, forking run, and the
locking guarantees kept by the lock files of ``core.locking``."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from images import BAD, GOOD, make_messy_folder
from scores import assert_same_ranking

NO_FCNTL = str(Path(__file__).parent / "no_fcntl")
CLI = "from coder_index_cli.main import cli; cli()"


def run(args, *, portable: bool, ok: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if portable:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [NO_FCNTL, env.get("PYTHONPATH")]))
    res = subprocess.run([sys.executable, "-c", CLI, *map(str, args)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert (res.returncode == 0) == ok, res.stdout + res.stderr
    return res


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return sorted(csv.DictReader(f), key=lambda r: r["path"])


def test_the_main_job_runs_without_fcntl_and_fork(tmp_path, tiny_model):
    probe = subprocess.run([sys.executable, "-c", "import os, sys, coder_index, coder_index_cli.main, "
                            "multiprocessing as m; from coder_index.core import locking; "
                            "print(locking.KERNEL_LOCKS, hasattr(os, 'fork'), m.get_start_method())"],
                           env={**os.environ, "PYTHONPATH": NO_FCNTL}, capture_output=True, text=True)
    assert probe.stdout.split() == ["False", "False", "spawn"], probe.stderr  # the platform is what we claim
    classes = tmp_path / "classes.txt"
    classes.write_text("red\nblue\ngray\nwhite\n")
    folder = make_messy_folder(tmp_path / "imgs")
    for name, portable in (("portable", True), ("posix", False)):
        run(["build", tmp_path / name, "--classes", classes, "--model", tiny_model, "-q"], portable=portable)
        # two decoding workers: started by spawn in the portable run
        run(["classify", folder, "--index", tmp_path / name, "--out", tmp_path / f"{name}.csv", "--workers", "2",
             "-q"], portable=portable)
        run(["explain", folder / GOOD[0], "--index", tmp_path / name, "-k", "3"], portable=portable)
    portable_rows, posix_rows = rows(tmp_path / "portable.csv"), rows(tmp_path / "posix.csv")
    assert len(portable_rows) == len(GOOD) and [r["path"] for r in portable_rows] == [r["path"] for r in posix_rows]
    for a, b in zip(portable_rows, posix_rows, strict=True):  # same batches; SCORE_ATOL all the same
        assert_same_ranking([a["label"]], [float(a["score"])], [b["label"]], [float(b["score"])], what=a["path"])
    assert len(rows(tmp_path / "portable.csv.errors.csv")) == len(BAD)
    # a second run on the same --out while one holds it is refused, naming the holder, with lock files too
    lock = tmp_path / "portable.csv.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from coder_index.core.locking import FileLock; "
                               "FileLock(sys.argv[1], 'x', remove=True).acquire(); print('held', flush=True); "
                               "time.sleep(60)", str(lock)], env={**os.environ, "PYTHONPATH": NO_FCNTL},
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = run(["classify", folder, "--index", tmp_path / "portable", "--out", tmp_path / "portable.csv", "-q"],
                  portable=True, ok=False)
        assert "in use by another coder-index process" in res.stderr and f"pid {holder.pid}" in res.stderr
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock file is taken over, and the run resumes (nothing left to do)
    res = run(["classify", folder, "--index", tmp_path / "portable", "--out", tmp_path / "portable.csv"],
              portable=True)
    assert len(rows(tmp_path / "portable.csv")) == len(GOOD) and not lock.exists()
