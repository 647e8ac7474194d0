"""Loaded first by a Python started with this folder on PYTHONPATH (tests only): the process runs as on
a platform without ``fcntl`` and without ``fork`` (Windows has neither; macOS starts workers by spawn),
so that the portable paths are what runs: the lock files of ``core.locking`` and spawned workers."""

import importlib.abc
import multiprocessing
import os
import sys


class _NoFcntl(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "fcntl":
            raise ImportError("No module named 'fcntl' (made unimportable for this test run)")
        return None


sys.modules.pop("fcntl", None)
sys.meta_path.insert(0, _NoFcntl())
multiprocessing.set_start_method("spawn", force=True)
if hasattr(os, "fork"):
    del os.fork  # anything that forks fails loudly instead of passing here and failing on Windows
