"""Issue-6 figures: a synthetic LAION-layout corpus of 1,000,000 rows, D = 512, ingested as `Flat`
and as an IVF-PQ factory: ingest rate (rows/s) and peak memory (each ingest in its own process),
query rate (images/s, K = 16) and recall@16 of IVF-PQ against Flat on 1,000 queries.

Data are clustered (2,000 centres + noise) rather than uniform, closer to real embeddings. Caption
embeddings come from the shards' text_emb (`use_text_embeddings`): encoding a million captions with
the CLIP text tower would take hours on CPU and is reported separately as texts/s.

    python benchmarks/bench_xmore_copied.py [--rows 1000000] [--factories IVF1024,PQ64 IVF1024,SQ8]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_data(root: Path, rows: int, dim: int, shards: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2000, dim)).astype(np.float32)
    for d in ("img_emb", "text_emb", "metadata"):
        (root / d).mkdir(parents=True, exist_ok=True)
    per = rows // shards
    for s in range(shards):
        lab = rng.integers(0, len(centres), per)
        img = centres[lab] + 0.6 * rng.standard_normal((per, dim)).astype(np.float32)
        np.save(root / "img_emb" / f"img_emb_{s}.npy", img)
        txt = centres[lab] + rng.standard_normal((per, dim)).astype(np.float32)
        np.save(root / "text_emb" / f"text_emb_{s}.npy", txt)
        captions = pa.table({"caption": [f"cluster {c}" for c in lab]})
        pq.write_table(captions, root / "metadata" / f"metadata_{s}.parquet")
    lab = rng.integers(0, len(centres), 1000)
    return centres[lab] + 0.6 * rng.standard_normal((1000, dim)).astype(np.float32), lab


CHILD = """
import json, resource, sys, time
from coder_index import ClipEncoder
from coder_index.pipeline.ingest_corpus import ingest_laion
root, out, factory = sys.argv[1:4]
enc = ClipEncoder("ViT-B-32", "random", device="cpu")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
m = ingest_laion(out, enc, root, factory=factory, use_text_embeddings=True)
print(json.dumps({"seconds": time.perf_counter() - t0, "rows": m["rows"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_before_ingest_mb": base / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--factories", nargs="+", default=["IVF1024,PQ64", "IVF1024,SQ8"])
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("bench-out/bench_xmore.json"))
    args = ap.parse_args()
    from coder_index.stores.corpus import Corpus

    tmp = Path(tempfile.mkdtemp(prefix="bench-xmore-"))
    t0 = time.perf_counter()
    queries, query_cluster = make_data(tmp / "laion", args.rows, 512, args.shards)
    print(f"data written in {time.perf_counter() - t0:.0f}s", flush=True)
    results = {"rows": args.rows, "dim": 512, "k": 16, "queries": len(queries)}
    found = {}
    for factory in ("Flat", *args.factories):
        out = tmp / f"corpus-{factory.replace(',', '_')}"
        res = subprocess.run([sys.executable, "-c", CHILD, str(tmp / "laion"), str(out), factory],
                             capture_output=True, text=True, check=True)
        ingest = json.loads(res.stdout.strip().splitlines()[-1])
        corpus = Corpus(out)
        corpus.set_nprobe(args.nprobe)
        corpus.search(queries[:10], 16)  # warm-up
        t0 = time.perf_counter()
        _, ids = corpus.search(queries, 16)
        q_s = time.perf_counter() - t0
        found[factory] = ids
        rows = corpus.rows(np.unique(ids).tolist())
        same = np.array([[rows[int(i)][0] == f"cluster {c}" for i in r]
                         for r, c in zip(ids, query_cluster, strict=True)])
        results[factory] = {"ingest_rows_per_s": round(ingest["rows"] / ingest["seconds"]),
                            "ingest_s": round(ingest["seconds"], 1), "peak_rss_mb": round(ingest["peak_rss_mb"]),
                            "rss_before_ingest_mb": round(ingest["rss_before_ingest_mb"]),
                            "query_images_per_s": round(len(queries) / q_s, 1),
                            "index_mb": round((out / "corpus.faiss").stat().st_size / 2**20),
                            "retrieved_caption_matches_query_cluster": round(float(same.mean()), 4)}
        if factory != "Flat":
            results[factory]["nprobe"] = args.nprobe
        print(factory, json.dumps(results[factory]), flush=True)
    for factory in args.factories:
        recall = np.mean([len(set(a) & set(b)) / 16 for a, b in zip(found["Flat"], found[factory], strict=True)])
        results[factory]["recall_at_16_vs_flat"] = round(float(recall), 4)
    print(json.dumps(results), flush=True)
    results["bench_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
