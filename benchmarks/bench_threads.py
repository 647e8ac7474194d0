"""Issue-11 figure: decode workers and torch threads chosen from the cores and the model
(``parallelism.choose``) against the old defaults (torch's own thread count, 2 workers), side by
side, each configuration in a fresh process, on small (CIFAR-10, 32 px) and large (ImageNet
sample, full-size) images, with the tiny test model and ViT-B-32 (random weights).

    python benchmarks/bench_threads.py [--cifar 600]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

RUN = r"""
import json, sys, time, tempfile, torch
from pathlib import Path
from coder_index import ClipEncoder, TextIndex
from coder_index.core.parallelism import choose
from coder_index.pipeline.classify import classify_folder
from coder_index.core.presets import TextRecipe
folder, model, mode = sys.argv[1:4]
enc = ClipEncoder(model, None if model.startswith("local-dir:") else "random", device="cpu")
tmp = Path(tempfile.mkdtemp())
index = TextIndex.create(tmp / "idx", enc, recipe=TextRecipe.make())
index.add_classes(["a", "b", "c"])
index.add_texts(index.recipe.name_texts(["a", "b", "c"]))
kw = {"workers": 2, "threads": torch.get_num_threads()} if mode == "old" else {}
plan = choose(enc, **kw)
t = time.perf_counter()
s = classify_folder(index, folder, tmp / "o.csv", progress=False, **kw)
dt = time.perf_counter() - t
print(json.dumps({"img_s": s.classified / dt, "threads": plan.threads, "workers": plan.workers}))
"""


def sample(src: Path, dst: Path, per_class: int) -> Path:
    for c in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / c.name).mkdir(parents=True)
        for f in sorted(c.iterdir())[:per_class]:
            os.symlink(f, dst / c.name / f.name)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cifar", type=int, default=600, help="CIFAR-10 images (a tenth per class)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/bench_threads.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_model import write_tiny_model

    tmp = Path(tempfile.mkdtemp())
    tiny = write_tiny_model(tmp / "tiny")
    folders = {"cifar10 (32 px)": sample(SHARED / "cifar10-test", tmp / "cifar", args.cifar // 10),
               "imagenet-samples (full size)": SHARED / "imagenet-samples"}
    results = []
    for model in (tiny, "ViT-B-32"):
        for name, folder in folders.items():
            row = {"model": "tiny" if model == tiny else model, "images": name}
            for mode in ("old", "auto"):
                out = subprocess.run([sys.executable, "-c", RUN, str(folder), model, mode], capture_output=True,
                                     text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                row[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            row["speedup"] = round(row["auto"]["img_s"] / row["old"]["img_s"], 2)
            results.append(row)
            print(json.dumps(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
