"""What a command does before its first image: the weights fingerprint remembered per weights file,
checkpoints memory-mapped (legacy files read whole), timm imported only when a model needs it, the
garbage collector paused around the imports, and the first-batch time in the -v log."""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch

from coder_index import ClipEncoder
from coder_index.core import file_identity
from coder_index.core.startup import paused_gc, process_age
from coder_index.model import encoder as encoder_module
from coder_index.model import fingerprint_cache
from coder_index.model.encoder import weights_checksum as REAL_CHECKSUM

from tiny_model import TINY_CONFIG

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "open_clip_pytorch_model.bin"


@pytest.fixture
def counted_checksums(monkeypatch):
    """How many times the weights were hashed (rather than their fingerprint remembered)."""
    calls = []
    real = encoder_module.weights_checksum

    def counting(model):
        calls.append(1)
        return real(model)

    monkeypatch.setattr(encoder_module, "weights_checksum", counting)
    return calls


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CODER_INDEX_CACHE_DIR", str(cache))
    monkeypatch.setattr(file_identity, "SETTLE_SECONDS", 0.0)  # files written by the test count as settled
    return cache


def _copy_model(src: str, dst: Path) -> Path:
    shutil.copytree(Path(src.removeprefix("local-dir:")), dst)
    return dst


def _true_sha(enc: ClipEncoder) -> str:
    """The fingerprint computed from the weights as loaded, bypassing the cache and the counter."""
    return REAL_CHECKSUM(enc.model)


def test_fingerprint_is_remembered_and_every_kind_of_change_is_seen(tmp_path, tiny_model, other_tiny_model,
                                                                      private_cache, counted_checksums):
    local = _copy_model(tiny_model, tmp_path / "model")
    name = f"local-dir:{local}"
    first = ClipEncoder(name, device="cpu")
    assert len(counted_checksums) == 1
    again = ClipEncoder(name, device="cpu")
    assert len(counted_checksums) == 1, "the same files were hashed again"
    assert again.fingerprint == first.fingerprint
    assert first.fingerprint.weights_sha256 == _true_sha(first)

    other_bytes = (Path(other_tiny_model.removeprefix("local-dir:")) / WEIGHTS).read_bytes()
    weights = local / WEIGHTS
    assert len(other_bytes) == weights.stat().st_size  # same size: only the content differs

    # 1. rewritten in place, its modification time put back: the status-change time still moves
    st = weights.stat()
    time.sleep(0.01)
    with open(weights, "r+b") as f:
        f.write(other_bytes)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = ClipEncoder(name, device="cpu")
    assert len(counted_checksums) == 2
    assert changed.fingerprint.weights_sha256 == _true_sha(changed) != first.fingerprint.weights_sha256

    # 2. replaced by a rename (another inode) with the first weights again
    shutil.copy(Path(tiny_model.removeprefix("local-dir:")) / WEIGHTS, tmp_path / "new.bin")
    os.replace(tmp_path / "new.bin", weights)
    back = ClipEncoder(name, device="cpu")
    assert len(counted_checksums) == 3
    assert back.fingerprint == first.fingerprint

    # 3. the folder's config touched, and a second weights file added: hashed again, same weights
    (local / "open_clip_config.json").write_text((local / "open_clip_config.json").read_text())
    ClipEncoder(name, device="cpu")
    assert len(counted_checksums) == 4
    shutil.copy(weights, local / "extra.pth")
    ClipEncoder(name, device="cpu")
    assert len(counted_checksums) == 5

    # 4. the same file under another model name (a built-in config) is another key
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "coder-tiny-start.json").write_text(json.dumps(TINY_CONFIG["model_cfg"]))
    open_clip.add_model_config(tmp_path / "cfgs")
    as_file = ClipEncoder("coder-tiny-start", pretrained=str(weights), device="cpu")
    assert len(counted_checksums) == 6
    assert as_file.fingerprint.weights_sha256 == first.fingerprint.weights_sha256
    ClipEncoder("coder-tiny-start", pretrained=str(weights), device="cpu")
    assert len(counted_checksums) == 6


def test_a_file_appearing_while_the_weights_load_is_not_remembered(tmp_path, tiny_model, private_cache,
                                                                  counted_checksums, monkeypatch):
    """open_clip picks the file it loads from what the folder holds when it looks: a listing that
    changed during the load keys nothing."""
    local = _copy_model(tiny_model, tmp_path / "model")
    real_build = ClipEncoder._build

    def build_then_add_a_file(self, *args, **kwargs):
        built = real_build(self, *args, **kwargs)
        shutil.copy(local / WEIGHTS, local / "late.pth")
        return built

    monkeypatch.setattr(ClipEncoder, "_build", build_then_add_a_file)
    ClipEncoder(f"local-dir:{local}", device="cpu")
    monkeypatch.setattr(ClipEncoder, "_build", real_build)
    (local / "late.pth").unlink()
    ClipEncoder(f"local-dir:{local}", device="cpu")
    assert len(counted_checksums) == 2  # the first load's listing was not remembered
    ClipEncoder(f"local-dir:{local}", device="cpu")
    assert len(counted_checksums) == 2


def test_fresh_files_are_always_hashed(tmp_path, tiny_model, counted_checksums, monkeypatch):
    monkeypatch.setenv("CODER_INDEX_CACHE_DIR", str(tmp_path / "cache"))
    local = _copy_model(tiny_model, tmp_path / "model")  # written just now: within SETTLE_SECONDS
    ClipEncoder(f"local-dir:{local}", device="cpu")
    ClipEncoder(f"local-dir:{local}", device="cpu")
    assert len(counted_checksums) == 2
    assert not (tmp_path / "cache" / fingerprint_cache.CACHE_NAME).exists()


def test_random_weights_are_remembered_by_their_config_and_seeding_code(tmp_path, private_cache,
                                                                        counted_checksums, monkeypatch):
    """Seeded weights are fixed by the model's config and the versions of torch and open_clip: another
    config under the same name, or another torch, is hashed again; the fingerprint is always the true
    sha256 of the weights (as every index built with them expects when it is opened again)."""
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "coder-tiny-random.json").write_text(json.dumps(TINY_CONFIG["model_cfg"]))
    open_clip.add_model_config(tmp_path / "cfgs")
    a = ClipEncoder("coder-tiny-random", pretrained="random", device="cpu")
    b = ClipEncoder("coder-tiny-random", pretrained="random", device="cpu")
    assert len(counted_checksums) == 1
    assert a.fingerprint == b.fingerprint and a.fingerprint.weights_sha256 == _true_sha(b)
    wider = json.loads(json.dumps(TINY_CONFIG["model_cfg"]))
    wider["vision_cfg"]["width"] = 96
    (tmp_path / "cfgs" / "coder-tiny-random.json").write_text(json.dumps(wider))
    open_clip.add_model_config(tmp_path / "cfgs")
    c = ClipEncoder("coder-tiny-random", pretrained="random", device="cpu")
    assert len(counted_checksums) == 2 and c.fingerprint.weights_sha256 == _true_sha(c) != a.fingerprint.weights_sha256
    monkeypatch.setattr(torch, "__version__", "0.0.0+another")
    ClipEncoder("coder-tiny-random", pretrained="random", device="cpu")
    assert len(counted_checksums) == 3


@pytest.mark.parametrize("damage", ["garbage", "list", "bad-values", "directory", "empty"])
def test_a_damaged_cache_means_hashing_again(tmp_path, tiny_model, private_cache, counted_checksums, damage):
    local = _copy_model(tiny_model, tmp_path / "model")
    name = f"local-dir:{local}"
    truth = ClipEncoder(name, device="cpu").fingerprint
    path = private_cache / fingerprint_cache.CACHE_NAME
    entries = json.loads(path.read_text())
    path.unlink()
    if damage == "garbage":
        path.write_bytes(b"\x00\xff{not json")
    elif damage == "list":
        path.write_text(json.dumps(list(entries)))
    elif damage == "bad-values":  # a value that is not a sha256: never used as a fingerprint
        path.write_text(json.dumps({k: {"sha256": "0" * 63 + "g", "used": 1} for k in entries}))
    elif damage == "directory":
        path.mkdir()
    else:
        path.write_text("")
    enc = ClipEncoder(name, device="cpu")
    assert enc.fingerprint == truth
    assert len(counted_checksums) == 2


def test_an_unwritable_cache_is_not_an_error(tmp_path, tiny_model, monkeypatch, counted_checksums):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CODER_INDEX_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(file_identity, "SETTLE_SECONDS", 0.0)
    local = _copy_model(tiny_model, tmp_path / "model")
    a = ClipEncoder(f"local-dir:{local}", device="cpu")
    b = ClipEncoder(f"local-dir:{local}", device="cpu")
    assert a.fingerprint == b.fingerprint
    assert len(counted_checksums) == 2


def test_cache_keeps_the_most_recently_used_entries(private_cache, monkeypatch):
    monkeypatch.setattr(fingerprint_cache, "MAX_ENTRIES", 3)
    for i in range(5):
        fingerprint_cache.remember(f"key{i}", f"{i:064x}")
    assert fingerprint_cache.lookup("key0") is None and fingerprint_cache.lookup("key1") is None
    assert fingerprint_cache.lookup("key4") == f"{4:064x}"
    assert len(json.loads((private_cache / fingerprint_cache.CACHE_NAME).read_text())) == 3


def test_legacy_checkpoints_load_and_mapping_is_switched_off_again(tmp_path, tiny_model, encoder):
    """torch's legacy (non-zip) format cannot be memory-mapped: read whole, same weights."""
    from torch.utils.serialization import config

    saved = torch.load(Path(tiny_model.removeprefix("local-dir:")) / WEIGHTS, weights_only=True)
    torch.save(saved, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "coder-tiny-legacy.json").write_text(json.dumps(TINY_CONFIG["model_cfg"]))
    open_clip.add_model_config(tmp_path / "cfgs")
    enc = ClipEncoder("coder-tiny-legacy", pretrained=str(tmp_path / "legacy.bin"), device="cpu")
    assert enc.fingerprint.weights_sha256 == encoder.fingerprint.weights_sha256
    got = enc.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in saved.items())
    assert config.load.mmap is False  # torch's switch is restored after every load


def test_gc_is_paused_only_for_the_duration(tiny_model):
    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()  # the caller's choice is kept
    finally:
        gc.enable()
    ClipEncoder(tiny_model, device="cpu")  # loading a model leaves the collector as it was
    assert gc.isenabled()


def _python(code: str, **env: str) -> str:
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO), **env})
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_timm_is_imported_only_when_a_model_needs_it(tmp_path, tiny_model):
    """In a fresh process (as the command line is): loading a ViT leaves timm unimported; then the
    caller's own open_clip code builds a timm-tower model, and ClipEncoder loads one, as before."""
    timm_cfg = {"model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"timm_model_name": "resnet18", "timm_model_pretrained": False, "timm_pool": "avg",
                       "timm_proj": "mlp", "image_size": 32},
        "text_cfg": TINY_CONFIG["model_cfg"]["text_cfg"]}, "preprocess_cfg": TINY_CONFIG["preprocess_cfg"]}
    out = _python(f"""
import gc, json, sys
from pathlib import Path
from coder_index import ClipEncoder
from coder_index.core import file_identity
enc = ClipEncoder({tiny_model!r}, device="cpu")
print("timm imported by a ViT:", "timm" in sys.modules)
print("gc enabled:", gc.isenabled())
import open_clip
print("to_2tuple:", open_clip.timm_model.to_2tuple(3))
Path({str(tmp_path / 'cfgs')!r}).mkdir()
Path({str(tmp_path / 'cfgs' / 'coder-tiny-timm.json')!r}).write_text({json.dumps(timm_cfg['model_cfg'])!r})
open_clip.add_model_config({str(tmp_path / 'cfgs')!r})
net = open_clip.create_model("coder-tiny-timm")
print("timm tower:", type(net.visual).__name__, type(net.visual.trunk).__module__.split(".")[0])
import torch
torch.save(net.state_dict(), {str(tmp_path / 'timm.bin')!r})
enc2 = ClipEncoder("coder-tiny-timm", pretrained={str(tmp_path / 'timm.bin')!r}, device="cpu")
import numpy as np
print("timm encoder:", enc2.encode_images(torch.zeros(1, 3, 32, 32)).shape)
""")
    assert "timm imported by a ViT: False" in out
    assert "gc enabled: True" in out
    assert "to_2tuple: (3, 3)" in out
    assert "timm tower: TimmModel timm" in out
    assert "timm encoder: (1, 32)" in out


def test_first_batch_time_is_logged_from_the_process_start(tmp_path, built_index):
    age = process_age()
    assert age is None or 0 < age < 24 * 3600
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(photos / "a.jpg")
    p = subprocess.run([sys.executable, "-c", "from coder_index_cli.main import cli; cli()", "-v", "classify",
                        str(photos), "--index", str(tmp_path / "idx"), "--out", str(tmp_path / "p.csv")],
                       capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(ln for ln in p.stderr.replace("\r", "\n").splitlines() if "first batch" in ln)
    m = re.search(r"first batch \(1 images\) ready ([0-9.]+) s after the process started, encoded at ([0-9.]+) s",
                  line)
    assert m, line
    ready, encoded = float(m.group(1)), float(m.group(2))
    assert 0 < ready <= encoded < 300


@pytest.mark.parametrize("kind", ["fifo", "folder", "broken-link"])
def test_a_special_file_among_a_folders_weights_is_refused_not_waited_on(tmp_path, tiny_model, kind):
    from coder_index import ModelLoadError

    local = _copy_model(tiny_model, tmp_path / "model")
    odd = local / "open_clip_model.safetensors"  # the name open_clip prefers
    if kind == "fifo":
        os.mkfifo(odd)
    elif kind == "folder":
        odd.mkdir()
    else:
        odd.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match="not a regular file"):
        ClipEncoder(f"local-dir:{local}", device="cpu")


def test_concurrent_writers_never_leave_a_damaged_cache_and_dead_writers_temps_go(private_cache):
    """Writers take turns and replace the file whole (temp + rename): a reader meets the old or the new
    entries, never a mix; no writer's entry is lost; a temp file left by a killed writer (its pid gone)
    is removed by the next writer."""
    import threading

    private_cache.mkdir(parents=True)
    stale = private_cache / f".{fingerprint_cache.CACHE_NAME}.999999999.0123abcd.tmp"
    stale.write_text("{")
    failures = []

    def writer(w: int) -> None:
        for i in range(40):
            fingerprint_cache.remember(f"w{w}-{i}", f"{w * 1000 + i:064x}")

    def reader() -> None:
        for _ in range(200):
            text = (private_cache / fingerprint_cache.CACHE_NAME).read_text() if \
                (private_cache / fingerprint_cache.CACHE_NAME).exists() else "{}"
            try:
                json.loads(text)
            except ValueError as exc:
                failures.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert not stale.exists()
    assert all(fingerprint_cache.lookup(f"w{w}-{i}") == f"{w * 1000 + i:064x}" for w in range(3) for i in range(40))
    assert not [p for p in private_cache.iterdir() if p.name.endswith(".tmp")]
