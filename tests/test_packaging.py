"""What the wheel ships: setuptools finds the packages (no list kept by hand), so every folder of
the source tree is in the wheel; every module imports from the wheel alone, with its data files."""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # built from a copy of what the sdist holds, so that setuptools' build/ lands there, not here
    src = out / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("coder_index", "coder_index_cli"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = out.glob("coder_index-*.whl")
    unpacked = out / "unpacked"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(unpacked)
    return unpacked


def source_modules() -> list[str]:
    mods = []
    for pkg in ("coder_index", "coder_index_cli"):
        for p in sorted((ROOT / pkg).rglob("*.py")):
            parts = p.relative_to(ROOT).with_suffix("").parts
            mods.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return mods


def test_every_source_module_and_data_file_is_in_the_wheel(wheel_dir):
    shipped = {str(p.relative_to(wheel_dir)) for p in wheel_dir.rglob("*") if p.is_file()}
    for mod in source_modules():
        path = mod.replace(".", "/")
        assert f"{path}.py" in shipped or f"{path}/__init__.py" in shipped, f"{mod} is missing from the wheel"
    for folder in ("coder_index/data", "coder_index/serve/static"):
        for p in (ROOT / folder).rglob("*"):
            if p.is_file() and p.suffix not in (".py", ".pyc") and not p.name.startswith("."):
                assert str(p.relative_to(ROOT)) in shipped, f"{p.relative_to(ROOT)} is missing from the wheel"
    assert not any(s.startswith(("cli/", "data/", "tests/")) for s in shipped)
    # the version comes from coder_index.__version__, its one place
    from coder_index import __version__

    assert f"coder_index-{__version__}.dist-info/METADATA" in shipped
    assert sum(p.endswith(".txt") for p in shipped if p.startswith("coder_index/data/classnames/")) == 14


def test_every_module_imports_from_the_wheel(wheel_dir, tmp_path):
    """A subprocess whose only copy of coder-index is the unpacked wheel (not this source tree)."""
    script = (
        "import importlib, json, sys\n"
        "mods = json.loads(sys.argv[1])\n"
        "failed = {}\n"
        "for m in mods:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as exc:\n"
        "        failed[m] = repr(exc)\n"
        "import coder_index\n"
        "from coder_index.core.presets import data_file\n"
        "datasets = len(data_file('cvpr24.json'))\n"
        "from coder_index.core.presets import shipped_class_list\n"
        "lists = str(shipped_class_list('imagenet'))\n"
        "print(json.dumps({'failed': failed, 'file': coder_index.__file__, 'datasets': datasets, 'lists': lists}))\n"
    )
    env = {"PYTHONPATH": str(wheel_dir), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", script, json.dumps(source_modules())], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["failed"] == {}
    assert Path(out["file"]).is_relative_to(wheel_dir)
    assert out["datasets"] > 10
    assert Path(out["lists"]).is_relative_to(wheel_dir) and Path(out["lists"]).name == "ImageNet.txt"
