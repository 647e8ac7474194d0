"""The text embedding cache: the README's main job's build, twice, into two new index folders with one
(fresh) cache; the second build's text-encoding time as a ratio of the first (`build --json`'s
text_encoding: texts encoded by the model, texts read from the cache, seconds spent on both), and each
build's wall time.

    python benchmarks/bench_textcache.py            # ImageNet: 1,000 classes, ~13,800 texts, ViT-B-32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--out", type=Path, default=Path("bench-out/bench_textcache.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-textcache-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CODER_INDEX_CACHE_DIR": str(work / "cache")}
    data = args.shared / "data"
    runs = []
    for name in ("first", "second"):
        cmd = [sys.executable, "-m", "coder_index_cli.main", "build", str(work / name), "--classes",
               str(data / "classnames" / "ImageNet.txt"), "--dataset", "imagenet", "--descriptors",
               str(data / "descriptors" / "descriptors_imagenet.json"), "--model", "ViT-B-32", "--pretrained",
               "random", "--json", "-q"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        report = json.loads(proc.stdout)
        runs.append({"build": name, "wall_s": round(wall, 2), **report["text_encoding"]})
        print(json.dumps(runs[-1]), flush=True)
    first, second = runs
    summary = {"runs": runs, "texts": first["encoded"] + first["from_cache"],
               "text_encoding_ratio_second_to_first": round(second["seconds"] / first["seconds"], 4),
               "wall_ratio_second_to_first": round(second["wall_s"] / first["wall_s"], 3)}
    print(json.dumps(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
