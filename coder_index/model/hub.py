"""Where a model's weights come from, and failing fast when the model hub cannot be reached.

open_clip downloads a pretrained tag's weights from the Hugging Face hub (or a URL). Without a
network, huggingface_hub retries for about 50 s before giving up. Instead: weights already in the
local cache are loaded offline; otherwise ``HF_HUB_OFFLINE`` is honoured, or one quick connection to
the hub tells within a few seconds, and the user gets one message with the fixes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from coder_index.core.errors import ModelLoadError

PROBE_TIMEOUT = 3.0
_TRUE = {"1", "true", "yes", "on"}


class HubUnreachable(ModelLoadError):
    """The weights must be downloaded and the hub cannot be reached. ``hints`` are the fixes; the CLI
    replaces them with the ones that apply to the command."""

    def __init__(self, what: str, why: str, hints: list[str] | None = None) -> None:
        self.what, self.why = what, why
        self.hints = hints or default_hints()
        super().__init__(self.render())

    def render(self) -> str:
        return (f"cannot download the weights of {self.what}: {self.why}, and they are not in the local cache. "
                f"Fixes: {'; '.join(self.hints)}")

    def with_hints(self, hints: list[str]) -> HubUnreachable:
        return HubUnreachable(self.what, self.why, hints)


def default_hints() -> list[str]:
    return ["pass a downloaded checkpoint as --pretrained /path/to/open_clip_pytorch_model.bin",
            "or --model local-dir:/path/to/dir (open_clip_config.json + open_clip_pytorch_model.bin, as on the hub)",
            "or --pretrained random for a trial with untrained weights"]


def offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def reachable(url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """One TCP connection to the URL's host, bounded in time."""
    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        return False
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hf_files(model: str, pretrained: str | None) -> tuple[str, list[str]] | None:
    """(repo id, candidate weight files) on the hub, or None if the weights are not on the hub."""
    import open_clip

    if model.startswith("hf-hub:"):
        return model[len("hf-hub:"):], ["open_clip_config.json"]
    if not pretrained:
        return None
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    hub = (cfg or {}).get("hf_hub", "")
    if not hub:
        return None
    repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
    filename = filename or "open_clip_pytorch_model.bin"
    try:
        from open_clip.pretrained import _get_safe_alternatives

        alternatives = [*_get_safe_alternatives(filename), filename]
    except ImportError:
        alternatives = [filename]
    return repo, list(dict.fromkeys(alternatives))


def _url(model: str, pretrained: str | None) -> str:
    import open_clip

    if not pretrained or model.startswith(("hf-hub:", "local-dir:")):
        return ""
    return (open_clip.get_pretrained_cfg(model, pretrained) or {}).get("url", "")


def in_cache(model: str, pretrained: str | None, cache_dir: str | None = None) -> bool:
    hf = _hf_files(model, pretrained)
    if hf is not None:
        from huggingface_hub import try_to_load_from_cache

        repo, files = hf
        return any(isinstance(try_to_load_from_cache(repo, f, cache_dir=cache_dir), str) for f in files)
    url = _url(model, pretrained)
    if url:
        target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        return target.is_file()
    return True  # nothing to download


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """huggingface_hub reads HF_HUB_OFFLINE once at import; flip its constant for one load."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


@contextlib.contextmanager
def fetch_policy(model: str, pretrained: str | None, cache_dir: str | None = None) -> Iterator[None]:
    """Load from the cache without touching the network when the weights are there; otherwise make
    sure the hub can be reached before open_clip starts its retries."""
    needs_download = model.startswith("hf-hub:") or (pretrained not in (None, "random")
                                                     and not Path(pretrained).is_file()
                                                     and not model.startswith("local-dir:"))
    if not needs_download:
        yield
        return
    what = model + (f" (pretrained={pretrained})" if pretrained else "")
    if in_cache(model, pretrained, cache_dir):
        with hub_offline():
            yield
        return
    hf = _hf_files(model, pretrained)
    url = hub_endpoint() if hf is not None else _url(model, pretrained)
    if offline_requested():
        raise HubUnreachable(what, "HF_HUB_OFFLINE is set")
    if url and not reachable(url):
        raise HubUnreachable(what, f"{urlparse(url).hostname} cannot be reached from this machine (no connection "
                                   f"within {PROBE_TIMEOUT:g} s)")
    logging.getLogger("huggingface_hub").propagate = False  # its retries are logged once, by its own handler
    yield


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")


def weight_files(model: str, pretrained: str | None, cache_dir: str | None = None) -> list[Path] | None:
    """The files a model's weights (and, for a folder or a hub repository, its config) are read from,
    when they are on disk and can be named: a checkpoint file, a ``local-dir:`` folder's config and
    weight files, a tag's or ``hf-hub:`` repository's files in the local cache. None otherwise
    (``random`` weights, or weights still to be downloaded)."""
    if model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:"):])
        try:
            files = [p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES or p.name == "open_clip_config.json"]
        except OSError:
            return None
        return sorted(files) or None
    if pretrained == "random":
        return None
    if pretrained and Path(pretrained).is_file():
        return [Path(pretrained)]
    hf = _hf_files(model, pretrained)
    if hf is not None:
        from huggingface_hub import try_to_load_from_cache

        repo, names = hf
        if model.startswith("hf-hub:"):  # the repository's config names no file: open_clip's usual names
            names = [*names, "open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        found = [try_to_load_from_cache(repo, name, cache_dir=cache_dir) for name in names]
        return [Path(f) for f in found if isinstance(f, str)] or None
    url = _url(model, pretrained)
    if url:
        target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        return [target] if target.is_file() else None
    return None
