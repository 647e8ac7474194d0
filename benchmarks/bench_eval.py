"""Issue-4 figure: `coder-index eval` wall time on ../shared/data/cifar10-test with a ViT-B-32
model (random weights: the compute is the real model's), first run vs a rerun that reads the cached
image embeddings. Stage-1 methods only (no LLM here).

    python benchmarks/bench_eval.py --shared ../shared
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

CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    ap.add_argument("--out", type=Path, default=Path("bench-out/bench_eval.json"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    env = {**os.environ, "CODER_INDEX_CACHE_DIR": str(tmp / "cache"), "NLTK_DATA": str(tmp / "nltk")}
    (tmp / "classes.txt").write_text("\n".join(CIFAR) + "\n")
    cli = [sys.executable, "-m", "coder_index_cli.main"]
    subprocess.run(cli + ["build", str(tmp / "idx"), "--classes", str(tmp / "classes.txt"), "--dataset", "cifar10",
                          "--model", "ViT-B-32", "--pretrained", "random", "--generate",
                          "attribute,analogous,synonym", "--llm", "none"], check=True, env=env)
    data = args.shared / "data" / "cifar10-test"
    times = []
    for run in ("first", "rerun"):
        t0 = time.perf_counter()
        subprocess.run(cli + ["eval", str(data), "--index", str(tmp / "idx"), "--out", str(tmp / f"rep-{run}"),
                              "--llm", "none", "--batch-size", "128", "-q"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
        print(f"{run}: {times[-1]:.1f}s", flush=True)
    rep = json.loads((tmp / "rep-rerun" / "report.json").read_text())
    result = {"images": rep["images"], "first_run_s": round(times[0], 1), "rerun_s": round(times[1], 1),
              "rerun_from_cache": rep["embeddings_from_cache"], "speedup": round(times[0] / times[1], 1),
              "methods": {m["name"]: m["images_per_s"] for m in rep["methods"]}}
    print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
