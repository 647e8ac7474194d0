"""Import open_clip without importing timm until a model needs it.

open_clip imports timm at its own import (``open_clip.timm_model``: ``import timm`` and four names of
``timm.layers``, in a try block that sets ``timm = None`` when timm is missing), although only models
with a timm vision tower (ConvNeXt, some ViTs) use it. timm's import brings in its whole model zoo:
0.41 s of open_clip's 2.2 s on a 2-core machine, paid by every command before its first image.

``import_open_clip`` imports open_clip with ``timm`` hidden, then gives ``open_clip.timm_model`` the
names that the try block would have bound, as stand-ins that import timm on first use. A timm-based
model, built by coder-index or by the caller's own open_clip code, therefore works as before; the
import costs nothing until then. Where timm is not installed, or open_clip was already imported, or
its timm adapter has another shape than the one described here, open_clip is imported as usual.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Any

# The names open_clip.timm_model binds from timm: (its name there, module, attribute in that module).
TIMM_NAMES = (("timm", "timm", None), ("RotAttentionPool2d", "timm.layers", "RotAttentionPool2d"),
              ("AbsAttentionPool2d", "timm.layers", "AttentionPool2d"), ("Mlp", "timm.layers", "Mlp"),
              ("to_2tuple", "timm.layers", "to_2tuple"))


class Deferred:
    """Stands for a module or one of its attributes; imports it at the first attribute read or call."""

    def __init__(self, module: str, attribute: str | None = None) -> None:
        self._where = (module, attribute)

    def resolve(self) -> Any:
        module, attribute = self._where
        target = importlib.import_module(module)
        return getattr(target, attribute) if attribute else target

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)  # copy/pickle/inspect probes: not a reason to import timm
        return getattr(self.resolve(), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        module, attribute = self._where
        return f"<deferred {module}{'.' + attribute if attribute else ''}>"


class _HideTimm(importlib.abc.MetaPathFinder):
    """timm is not found - by the thread importing open_clip only; other threads import it as usual."""

    def __init__(self) -> None:
        import threading

        self.thread = threading.get_ident()

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        import threading

        if (name == "timm" or name.startswith("timm.")) and threading.get_ident() == self.thread:
            raise ModuleNotFoundError(f"No module named {name!r} (deferred by coder-index)", name=name)
        return None


def import_open_clip() -> ModuleType:
    """open_clip, imported with timm deferred where that is safe (see the module's docstring)."""
    if "open_clip" in sys.modules or "timm" in sys.modules or importlib.util.find_spec("timm") is None:
        import open_clip

        return open_clip
    hider = _HideTimm()
    sys.meta_path.insert(0, hider)
    try:
        import open_clip
    except ImportError:
        # some part of this open_clip needs timm at import: import it again, plainly
        for name in [n for n in sys.modules if n == "open_clip" or n.startswith("open_clip.")]:
            del sys.modules[name]
        sys.meta_path.remove(hider)
        import open_clip

        return open_clip
    finally:
        if hider in sys.meta_path:
            sys.meta_path.remove(hider)
    _point_at_deferred_timm()
    return open_clip


def _point_at_deferred_timm() -> None:
    """Every open_clip module that bound ``timm = None`` while it was hidden gets the stand-ins; the
    adapter module also gets the four names of ``timm.layers`` its try block would have bound."""
    for name, module in list(sys.modules.items()):
        if not (name == "open_clip" or name.startswith("open_clip.")) or module is None:
            continue
        if "timm" in vars(module) and module.timm is None:
            module.timm = Deferred("timm")
            if name == "open_clip.timm_model":
                for local, source, attribute in TIMM_NAMES[1:]:
                    if local not in vars(module):
                        setattr(module, local, Deferred(source, attribute))
