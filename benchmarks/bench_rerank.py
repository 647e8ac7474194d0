"""Issue-4 figure: vectorised rerank vs a per-image, per-pair loop (the released code's shape).

Synthetic but ImageNet-shaped: each image's stage-1 logits favour a neighbourhood of classes, so
the top-5 pair set is realistic rather than all C^2 pairs; every ordered pair that occurs has
4 texts of width 512. The loop is given pre-normalised text matrices (fair to it) and is timed on
a sample of images, then scaled linearly (it is linear in N; stated in the output).

    python benchmarks/bench_rerank.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from coder_index import rerank


def make_case(n: int, c: int, d: int = 512, k: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    centre = rng.integers(0, c, n)
    logits = rng.standard_normal((n, c)).astype(np.float32)
    nb = (centre[:, None] + rng.integers(-6, 7, (n, 8))) % c  # confusions stay among nearby classes
    np.put_along_axis(logits, nb, logits.max(1, keepdims=True) + rng.random((n, 8)).astype(np.float32) * 3, axis=1)
    top = np.argsort(-logits, axis=1)[:, :5]
    pairs = {(int(a), int(b)) for row in top for a in row for b in row if a != b}
    pair_texts = {p: rng.standard_normal((k, d)).astype(np.float32) for p in pairs}
    return x, logits, pair_texts


def loop_rerank(x, logits, normed, top=5):
    out = np.empty(len(x), dtype=np.int64)
    for n in range(len(x)):
        xn = x[n] / np.linalg.norm(x[n])
        order = np.argsort(-logits[n], kind="stable")[:top]
        totals = []
        for a in order:
            s = 0.0
            for b in order:
                if a != b and (a, b) in normed and (b, a) in normed:
                    s += float(np.mean(normed[(a, b)] @ xn) - np.mean(normed[(b, a)] @ xn))
            totals.append(s)
        out[n] = order[int(np.argmax(totals))]
    return out


def run(n: int, c: int, loop_sample: int) -> dict:
    x, logits, pair_texts = make_case(n, c)
    normed = {p: t / np.linalg.norm(t, axis=1, keepdims=True) for p, t in pair_texts.items()}
    t0 = time.perf_counter()
    fast = rerank(x, logits, pair_texts)
    t_fast = time.perf_counter() - t0
    m = min(n, loop_sample)
    t0 = time.perf_counter()
    slow = loop_rerank(x[:m], logits[:m], normed)
    t_loop = (time.perf_counter() - t0) * n / m
    return {"images": n, "classes": c, "ordered_pairs": len(pair_texts), "vectorised_s": round(t_fast, 3),
            "loop_s": round(t_loop, 2), "loop_timed_on": m, "speedup": round(t_loop / t_fast, 1),
            "agree_on_loop_sample": bool((fast[:m] == slow).all()),
            "changed_by_rerank": round(float((fast != logits.argmax(1)).mean()), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loop-sample", type=int, default=20_000)
    ap.add_argument("--out", type=Path, default=Path("bench-out/bench_rerank.json"))
    args = ap.parse_args()
    results = [run(20_000, 60, args.loop_sample), run(100_000, 1000, args.loop_sample)]
    for r in results:
        print(json.dumps(r), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
