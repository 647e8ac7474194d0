"""`coder-index eval`'s image encoding, images/s: this checkout against another one, side by side.

eval reads its images through the one feed (pipeline/encode_images) since coder-index 0.4; before,
it had a loader of its own. This times the encoding step of `eval` (report.json's encode_seconds:
read, decode, preprocess in workers, encode; no embedding-cache hit, a fresh cache file per run)
on real photos (../shared/data/imagenet-samples, one class folder per photo, linked `--copies`
times), ViT-B-32 with random weights, in fresh processes, the two checkouts alternating, and
reports the medians and their ratio.

    git worktree add /tmp/before <commit>
    python benchmarks/bench_eval_feed.py --compare-repo /tmp/before --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--compare-repo", type=Path, required=True, help="the other checkout (e.g. a worktree of main)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--copies", type=int, default=2, help="links of each photo (250 photos each)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("bench-out/bench_eval_feed.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-eval-feed-"))
    photos = sorted((args.shared / "data" / "imagenet-samples").glob("*.JPEG"))
    classes = []
    for p in photos:  # n01440764_tench.JPEG -> class folder "tench" (one photo per class, linked)
        name = p.stem.split("_", 1)[1]
        folder = work / "data" / name
        folder.mkdir(parents=True, exist_ok=True)
        for c in range(args.copies):
            os.link(p, folder / f"{c}.jpg")
        classes.append(name)
    (work / "classes.txt").write_text("\n".join(classes) + "\n")
    base = {**os.environ, "HF_HUB_OFFLINE": "1", "CODER_INDEX_CACHE_DIR": str(work / "cache")}
    run = [sys.executable, "-m", "coder_index_cli.main"]
    subprocess.run(run + ["build", str(work / "idx"), "--classes", str(work / "classes.txt"), "--model", "ViT-B-32",
                          "--pretrained", "random", "-q"], check=True, env={**base, "PYTHONPATH": str(REPO)},
                   cwd=work)
    results: dict[str, list[float]] = {"this": [], "other": []}
    n = 0
    for r in range(args.runs):
        for who, repo in (("this", REPO), ("other", args.compare_repo)):
            out = work / f"rep-{who}-{r}"
            cmd = run + ["eval", str(work / "data"), "--index", str(work / "idx"), "--out", str(out), "--methods",
                         "coder", "--llm", "none", "--tsne-samples", "0", "--embedding-cache",
                         str(work / f"emb-{who}-{r}.sqlite"), "-q"]
            if args.workers is not None:
                cmd += ["--workers", str(args.workers)]
            subprocess.run(cmd, check=True, env={**base, "PYTHONPATH": str(repo)}, cwd=work,
                           stdout=subprocess.DEVNULL)
            rep = json.loads((out / "report.json").read_text())
            assert rep["embeddings_from_cache"] == 0
            n = rep["encoded"]
            results[who].append(n / rep["encode_seconds"])
            print(f"run {r + 1} {who}: {n} images, {results[who][-1]:.1f} img/s", flush=True)
    summary = {"images": n, "runs": args.runs, "this_img_s": [round(x, 2) for x in results["this"]],
               "other_img_s": [round(x, 2) for x in results["other"]],
               "median_this": round(statistics.median(results["this"]), 2),
               "median_other": round(statistics.median(results["other"]), 2)}
    summary["ratio_this_to_other"] = round(summary["median_this"] / summary["median_other"], 3)
    print(json.dumps(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
