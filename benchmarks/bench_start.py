"""Issue-22 point 5: the fixed cost of `coder-index classify` before its first images are encoded,
against what no run can avoid: `import torch` plus reading the weights. Both are measured in fresh
processes, alternating, on the same weights file (figures printed and saved as JSON, never asserted).

    python benchmarks/bench_start.py                         # ViT-B-32 weights file, 3 runs of each
    python benchmarks/bench_start.py --model ViT-L-14 --device cuda --runs 5
    python benchmarks/bench_start.py --compare-repo /tmp/before   # also the whole command of another checkout

* baseline: a process that imports torch and torch.loads the checkpoint (seconds since the process
  started, read from /proc, after each);
* first batch: `coder-index -v classify` of one photo (a `local-dir:` model whose weights file is on disk
  and in the page cache, as on a user's second run); the time comes from its log line "first batch ...
  ready N s after the process started" (decoded and on the device, about to be encoded);
* beyond = first batch - baseline, per pair of runs, then the median: the goal is at most 3 s;
* wall: the whole command, start to exit, for this checkout and, with --compare-repo, another one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
FIRST = re.compile(r"first batch \((\d+) images\) ready ([0-9.]+) s after the process started, encoded at ([0-9.]+) s")


def make_model(folder: Path, name: str) -> Path:
    """A local-dir: model with seeded random weights (no hub here), saved as open_clip's repositories are."""
    import open_clip
    import torch

    if (folder / "open_clip_pytorch_model.bin").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = open_clip.create_model(name, pretrained=None)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config(name),
                                                               "preprocess_cfg": {}}))
    torch.save(net.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Runs in a folder of no checkout, so that PYTHONPATH alone says whose code runs."""
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return wall, p.stdout + p.stderr


BASELINE = """
import os, sys
def process_age():  # as coder_index.core.startup.process_age, without importing coder_index
    stat = open("/proc/self/stat").read()
    uptime = float(open("/proc/uptime").read().split()[0])
    return uptime - int(stat.rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
import torch
a = process_age()
torch.load(sys.argv[1], map_location="cpu", weights_only=True)
print("BASELINE", a, process_age())
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, help="keep the model, index and photos here (default: a temp folder)")
    ap.add_argument("--compare-repo", type=Path, help="another checkout whose whole command is timed beside this one")
    ap.add_argument("--out", type=Path, default=Path("bench_start.json"))
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-start-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = make_model(work / args.model, args.model)
    weights = model_dir / "open_clip_pytorch_model.bin"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-c", "from coder_index_cli.main import cli; cli()"]
    index = work / f"index-{args.model}"
    if not index.exists():
        classes = work / "classes.txt"
        classes.write_text("\n".join((SHARED / "classnames" / "ImageNet.txt").read_text().splitlines()[:20]) + "\n")
        run([*cli, "build", str(index), "--classes", str(classes), "--model", f"local-dir:{model_dir}",
             "--device", args.device], env)
    photos = work / "one-photo"
    if not photos.exists():
        photos.mkdir()
        first = sorted((SHARED / "imagenet-samples").glob("*.JPEG"))[0]
        os.link(first, photos / first.name)

    def classify(cmd: list[str], out: Path, extra_env: dict[str, str]) -> tuple[float, float | None]:
        out.unlink(missing_ok=True)
        Path(f"{out}.errors.csv").unlink(missing_ok=True)
        Path(f"{out}.run.json").unlink(missing_ok=True)
        wall, text = run([*cmd, "-v", "classify", str(photos), "--index", str(index), "--out", str(out),
                          "--device", args.device], {**env, **extra_env})
        m = FIRST.search(text)
        return wall, float(m.group(2)) if m else None

    names = ("import_torch", "read_weights", "first_batch", "wall", "wall_other")
    rows: dict[str, list[float]] = {k: [] for k in names}
    for i in range(args.runs):
        _, text = run([sys.executable, "-c", BASELINE, str(weights)], env)
        a, b = (float(v) for v in text.split("BASELINE")[1].split())
        rows["import_torch"].append(a)
        rows["read_weights"].append(b - a)
        wall, first = classify(cli, work / "p.csv", {})
        rows["wall"].append(wall)
        if first is not None:
            rows["first_batch"].append(first)
        if args.compare_repo:
            other = [sys.executable, "-c", "from coder_index_cli.main import cli; cli()"]
            wall_other, _ = classify(other, work / "q.csv", {"PYTHONPATH": str(args.compare_repo)})
            rows["wall_other"].append(wall_other)
        print(f"run {i + 1}: import torch {a:.2f} s, read weights {b - a:.2f} s, first batch "
              f"{first if first is not None else float('nan'):.2f} s, whole command {wall:.2f} s"
              + (f", other checkout's whole command {rows['wall_other'][-1]:.2f} s" if args.compare_repo else ""),
              flush=True)
    if len(rows["first_batch"]) == len(rows["import_torch"]):  # each run's own difference, then their median
        rows["beyond"] = [f - a - b for f, a, b in zip(rows["first_batch"], rows["import_torch"],
                                                       rows["read_weights"], strict=True)]
    med = {k: round(statistics.median(v), 3) for k, v in rows.items() if v}
    result = {"model": args.model, "device": args.device, "runs": args.runs, "median_seconds": med,
              "goal_beyond_seconds": 3.0, "all": rows}
    print(json.dumps(result, indent=2))
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
