"""The private parts of other packages that coder-index relies on, checked by name: when a release
moves them, these tests fail saying which package, which version, and which coder-index module to
update (pyproject.toml bounds those packages to the tested range)."""

from __future__ import annotations

import importlib.metadata as md
import inspect
import subprocess
import sys

import pytest


def moved(dist: str, what: str, user: str) -> str:
    return (f"{dist} {md.version(dist)} moved {what}, which {user} relies on: update {user}, then the bound of "
            f"{dist} in pyproject.toml")


def test_open_clip_pretrained_helpers():
    import open_clip

    assert callable(getattr(open_clip, "get_pretrained_cfg", None)), \
        moved("open_clip_torch", "open_clip.get_pretrained_cfg", "coder_index/model/hub.py")
    try:
        from open_clip.pretrained import _get_safe_alternatives
    except ImportError:
        pytest.fail(moved("open_clip_torch", "open_clip.pretrained._get_safe_alternatives",
                          "coder_index/model/hub.py"))
    alternatives = list(_get_safe_alternatives("open_clip_pytorch_model.bin"))
    assert "open_clip_model.safetensors" in alternatives, \
        moved("open_clip_torch", "the safetensors names of _get_safe_alternatives", "coder_index/model/hub.py")


def test_open_clip_binds_timm_as_lazy_timm_expects():
    """A fresh process: open_clip imported through lazy_timm binds timm's names as stand-ins (the
    shape of open_clip.timm_model's try block), and a timm-based model still builds."""
    pytest.importorskip("timm")
    script = (
        "from coder_index.model.lazy_timm import TIMM_NAMES, Deferred, import_open_clip\n"
        "import sys\n"
        "oc = import_open_clip()\n"
        "tm = sys.modules['open_clip.timm_model']\n"
        "bound = [n for n, _, _ in TIMM_NAMES if isinstance(vars(tm).get(n), Deferred)]\n"
        "print('timm' in sys.modules, ','.join(bound))\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    timm_imported, bound = res.stdout.split()
    assert timm_imported == "False" and bound.split(",") == [n for n, _, _ in __import__(
        "coder_index.model.lazy_timm", fromlist=["TIMM_NAMES"]).TIMM_NAMES], \
        moved("open_clip_torch", "the timm imports of open_clip.timm_model", "coder_index/model/lazy_timm.py")


def test_uvicorn_h11_protocol_internals():
    """serve/guard.py subclasses uvicorn's H11Protocol: the methods it overrides and the state it reads."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    user = "coder_index/serve/guard.py"
    for method in ("connection_made", "connection_lost", "data_received", "on_response_complete"):
        assert callable(getattr(H11Protocol, method, None)), moved("uvicorn", f"H11Protocol.{method}", user)
    source = inspect.getsource(H11Protocol)
    for attribute in ("self.conn", "self.cycle", "self.transport", "self.connections", "self.loop", "self.logger"):
        assert attribute in source, moved("uvicorn", f"H11Protocol's {attribute}", user)
    assert "response_complete" in inspect.getsource(sys.modules[H11Protocol.__module__]), \
        moved("uvicorn", "RequestResponseCycle.response_complete", user)
