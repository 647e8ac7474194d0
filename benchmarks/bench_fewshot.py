"""Issue-5 figure: hyper-parameter search time, vectorised over the grid vs the released code's
nested loops (for beta: for alpha: recompute the cache logits), on 1,000 validation images,
1,600 support images (100 classes x 16 shots) and K = 2,000 texts. Both search the same grids
(40 x 20, then two 10 x 10 refinements) and must pick the same alpha and beta.

    python benchmarks/bench_fewshot.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from coder_index import CoderAdapter
from coder_index.fewshot.adapter import default_grid, search_hyperparameters


def make_case(n_val=1000, classes=100, shots=16, k=2000, seed=0):
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((classes, k)).astype(np.float32)
    y_sup = np.repeat(np.arange(classes), shots)
    sup = protos[y_sup] + 7.0 * rng.standard_normal((len(y_sup), k)).astype(np.float32)
    y_val = rng.integers(0, classes, n_val)
    val = protos[y_val] + 7.0 * rng.standard_normal((n_val, k)).astype(np.float32)
    zs = (rng.standard_normal((n_val, classes)) * 2).astype(np.float32)
    zs[np.arange(n_val), y_val] += 1.5
    return sup, y_sup, val, y_val, zs, classes


def loop_search(adapter, val, y, zs, beta_steps=40, alpha_steps=20, refine_steps=10, refinements=2):
    """The released code's shape: a Python loop over every (beta, alpha) of each grid."""
    a = torch.from_numpy(adapter.affinity(val))
    values = torch.from_numpy(adapter.values_)
    zs_t, y_t = torch.from_numpy(zs), torch.from_numpy(y)
    betas, alphas = default_grid(beta_steps, alpha_steps)
    best = None
    for _ in range(refinements + 1):
        round_best = None
        for beta in betas:
            for alpha in alphas:
                cache = ((-1) * (beta - beta * a)).exp() @ values
                acc = float(((zs_t + alpha * cache).argmax(1) == y_t).float().mean())
                if round_best is None or acc > round_best[2]:
                    round_best = (float(beta), float(alpha), acc)
        if best is None or round_best[2] > best[2]:
            best = round_best
        betas = np.linspace(0.5 * best[0], 1.5 * best[0], refine_steps)
        alphas = np.linspace(0.5 * best[1], 1.5 * best[1], refine_steps)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-out/bench_fewshot.json"))
    args = ap.parse_args()
    sup, y_sup, val, y_val, zs, c = make_case()
    ad = CoderAdapter(1.0, 1.0).fit(sup, y_sup, c)
    t0 = time.perf_counter()
    fast = search_hyperparameters(ad, val, y_val, zs)
    t_fast = time.perf_counter() - t0
    ad2 = CoderAdapter(1.0, 1.0).fit(sup, y_sup, c)
    t0 = time.perf_counter()
    slow = loop_search(ad2, val, y_val, zs)
    t_loop = time.perf_counter() - t0
    result = {"val_images": len(y_val), "support_images": len(y_sup), "texts": sup.shape[1], "classes": c,
              "grid_points": 40 * 20 + 2 * 10 * 10, "vectorised_s": round(t_fast, 2), "loops_s": round(t_loop, 2),
              "speedup": round(t_loop / t_fast, 1),
              "vectorised_best": {"beta": fast["beta"], "alpha": fast["alpha"], "acc": fast["val_accuracy"]},
              "loops_best": {"beta": slow[0], "alpha": slow[1], "acc": slow[2]},
              "same_choice": bool(np.isclose(fast["beta"], slow[0]) and np.isclose(fast["alpha"], slow[1]))}
    # top-k affinity (a search of the support index) vs exact, at the searched alpha/beta
    import faiss

    from coder_index.fewshot.adapter import neighbour_cache_logits
    from coder_index.validation import l2_normalize

    keys = l2_normalize(sup, "support")
    index = faiss.IndexFlatIP(keys.shape[1])
    index.add(keys)
    q = l2_normalize(val, "val")
    exact = ad.logits(val, zs)
    result["topk_accuracy"] = {"exact": round(float((exact.argmax(1) == y_val).mean()), 4)}
    row_min = -index.search(-q, 1)[0][:, 0]  # the farthest key: exact row minimum
    for k in (400, 100, 25):
        sims, ids = index.search(q, k)
        for name, lo in (("exact_min", row_min), ("min_of_k", None)):
            approx = zs + fast["alpha"] * neighbour_cache_logits(sims, ids, y_sup, c, fast["beta"], ad.T, row_min=lo)
            result["topk_accuracy"][f"k={k},{name}"] = round(float((approx.argmax(1) == y_val).mean()), 4)
    print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
