"""X-MoRe's settings side by side on the test data, by `eval` on the same images (the top-1 of xmore and
coder+xmore under each): the normalisers (the corpus's own, the default: an image's answer is its own;
the mean over the evaluated set, 0.4's; the released running sums) and the caption retrieval (the K
nearest images' captions, the default, against the released rule: 200 neighbours, 128 captions,
duplicates removed, ordered by image-caption similarity).

The corpus is CIFAR-10 test images with their class name as caption (the first --corpus-per-class
of each class), the evaluated set the next --eval-per-class images (disjoint). With random weights
(the only ones here) the accuracies are near chance: the differences between normalisers, not the
accuracies, are what to read.

    python benchmarks/bench_xmore_normalizers.py [--model tiny|ViT-B-32] [--eval-per-class 50]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


# (normaliser, retrieval): the default, the two other normalisers, and the released retrieval rule
SETTINGS = [("corpus", "nearest"), ("set", "nearest"), ("running", "nearest"), ("corpus", "released")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--corpus-per-class", type=int, default=100)
    ap.add_argument("--eval-per-class", type=int, default=50)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-xmore-norm-"))
    cifar = args.shared / "data" / "cifar10-test"
    classes = sorted(p.name for p in cifar.iterdir())
    (work / "classes.txt").write_text("\n".join(classes) + "\n")
    with open(work / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        for c in classes:
            files = sorted((cifar / c).iterdir())
            (work / "corpus-images" / c).mkdir(parents=True)
            (work / "test" / c).mkdir(parents=True)
            for p in files[:args.corpus_per_class]:
                shutil.copy(p, work / "corpus-images" / c / p.name)
                w.writerow([f"{c}/{p.name}", c])
            for p in files[args.corpus_per_class:args.corpus_per_class + args.eval_per_class]:
                shutil.copy(p, work / "test" / c / p.name)
    if args.model == "tiny":
        from tiny_model import write_tiny_model

        model, pretrained = write_tiny_model(work / "model", seed=0), []
    else:
        model, pretrained = args.model, ["--pretrained", "random"]
    cli = [sys.executable, "-m", "coder_index_cli.main"]
    env_run = {"check": True, "cwd": work, "stdout": subprocess.DEVNULL}
    subprocess.run(cli + ["build", "idx", "--classes", "classes.txt", "--model", model, *pretrained, "--llm", "none",
                          "-q"], **env_run)
    subprocess.run(cli + ["corpus", "build", "corpus", "--images", "corpus-images", "--captions", "captions.csv",
                          "--index", "idx", "-q"], **env_run)
    reports = {}
    for normalizer, retrieval in SETTINGS:
        name = f"{normalizer}/{retrieval}"
        subprocess.run(cli + ["eval", "test", "--index", "idx", "--corpus", "corpus", "--methods", "xmore,coder+xmore",
                              "--xmore-normalizer", normalizer, "--xmore-retrieval", retrieval,
                              "--out", f"rep-{normalizer}-{retrieval}", "--tsne-samples", "0",
                              "--llm", "none", "-q"], **env_run)
        reports[name] = json.loads((work / f"rep-{normalizer}-{retrieval}" / "report.json").read_text())
    out = {"model": args.model, "images": reports["corpus/nearest"]["images"], "corpus_rows": len(classes) *
           args.corpus_per_class, "top1 (normaliser/retrieval)": {n: {m["name"]: m["top1"] for m in r["methods"]}
                                                                  for n, r in reports.items()}}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
