"""The fixed cost of a command before its first image: what is measured and what is cut.

Importing open_clip (and through it torchvision, timm and torch._dynamo) creates a few hundred
thousand long-lived objects. Python's cyclic garbage collector runs full collections over them while
they are being created, and again when the interpreter exits, and finds no garbage: on a 2-core
machine the import took 2.7 s with the collector running and 2.0 s with it paused, and the exit
after it 1.3 s against 0.2 s with those objects frozen. ``paused_gc`` is used around such imports;
``freeze_after_loading`` (which the command line turns on) makes ``settle_imports`` move everything
that exists once the model is loaded out of the collector's sight for the rest of the process.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator

_FREEZE = {"enabled": False}


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic collector paused for the duration (reference counting still frees everything that is
    not in a cycle); the caller's setting is restored."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def freeze_after_loading(enabled: bool = True) -> None:
    """Opt in (a command-line process) to ``settle_imports`` freezing the objects that exist once a model is
    loaded: modules, classes and weights that live until the process ends."""
    _FREEZE["enabled"] = enabled


def settle_imports() -> None:
    """Called once the heavy imports and the model are in place."""
    if _FREEZE["enabled"]:
        gc.freeze()


def process_age() -> float | None:
    """Seconds since this process started (Linux, to 10 ms), or None where the system does not say."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
        # fields after the command name, which is in parentheses and may hold spaces
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None
