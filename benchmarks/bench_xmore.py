"""X-MoRe at corpus scale, on this machine: a synthetic LAION-layout folder (clustered D=512 embeddings
stored fp16, as LAION ships them; captions in parquet), corpora by reference over it (IVF-PQ trained
on a sample, sized for each corpus as autofaiss sizes it: see ``auto_factory``), and:

* ingest by reference: seconds and bytes written (no copy of the embeddings: the index alone);
* queries/s at K=16 for 1,000 images (FAISS alone, the corpus's search, which gives the index's pages
  back after each 64 queries, and X-MoRe's whole caption path: search, caption lookup, caption
  encoding through the text cache);
* recall@16 of the IVF-PQ index against exact search, on the 1M-row subset, and the share of
  retrieved rows from the query image's own cluster (what decides the captions X-MoRe gets);
* peak memory of ``classify --method xmore`` over 1,000 images at 1M and at 10M rows, against
  ``--method coder`` (the model and the pipeline alone): peak RSS, and its anonymous part (what the
  process allocates) apart from its file-backed part (the memory-mapped index's pages: page cache the
  kernel can take back, shared between processes);
* with ``--service``: queries/s of clip-retrieval's back-end (``.knn-venv``) against the same rows
  searched locally, over a 100,000-row Flat indice.

    python benchmarks/bench_xmore.py --rows 10000000 --work /tmp/bench-xmore [--service]

The folder is written once (10M rows: ~10 GB) and reused when present. Figures go to stdout as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
WORDS = ["cat", "dog", "ship", "truck", "bird", "plane", "horse", "frog", "deer", "car"]


def generate(root: Path, rows: int, shard_rows: int, dim: int, seed: int = 0) -> None:
    """LAION's layout: img_emb_N.npy (fp16) and metadata_N.parquet (caption, url) per shard. Rows sit in
    1,000 clusters and vary within a cluster along 32 directions (image embeddings have a low intrinsic
    dimension: isotropic noise in 512 dimensions would make "the nearest neighbours" a lottery), plus a
    little isotropic noise. Captions are unique per row and name the row's class word; each row's
    cluster is kept in clusters.npy for the benchmark to score what was retrieved."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if (root / "done").exists():
        return
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = (rng.standard_normal((32, dim)) / np.sqrt(dim)).astype(np.float32)
    (root / "img_emb").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(exist_ok=True)
    clusters = np.empty(rows, np.int16)
    for s, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        c = rng.integers(0, len(centres), n)
        clusters[start:start + n] = c
        emb = np.empty((n, dim), np.float16)
        for b in range(0, n, 100_000):
            cb = c[b:b + 100_000]
            part = centres[cb] + (0.6 / np.sqrt(32)) * rng.standard_normal((len(cb), 32), np.float32) @ basis
            part += (0.1 / np.sqrt(dim)) * rng.standard_normal((len(cb), dim), np.float32)
            emb[b:b + len(part)] = part / np.linalg.norm(part, axis=1, keepdims=True)
        np.save(root / "img_emb" / f"img_emb_{s}.npy", emb)
        words = np.asarray(WORDS)[c % len(WORDS)].tolist()
        captions = pa.array([f"{w} number {start + i}, seen in place {k}" for i, (w, k)
                             in enumerate(zip(words, c.tolist(), strict=True))])
        pq.write_table(pa.table({"caption": captions, "url": pa.array([f"http://img.example/{start + i}.jpg"
                                                                       for i in range(n)])}),
                       root / "metadata" / f"metadata_{s}.parquet", row_group_size=10_000)
        print(f"  shard {s}: {n} rows", file=sys.stderr, flush=True)
    np.save(root.parent / "clusters.npy", clusters)
    (root / "done").write_text("")


def auto_factory(rows: int) -> str:
    """IVF-PQ as autofaiss sizes it for a corpus this big: about 4 sqrt(rows) inverted lists (a power of
    two), an HNSW coarse quantizer (assigning 10M rows to 16k centroids exhaustively takes hours here),
    64-byte PQ codes. Lists that grow with the corpus keep a query's scan, and the pages it reads, the
    same size."""
    nlist = 2 ** round(np.log2(4 * np.sqrt(rows)))
    return f"IVF{nlist}_HNSW32,PQ64"


def subset(root: Path, full: Path, shards: int) -> None:
    """The first ``shards`` shards of ``full``, linked (nothing copied)."""
    for sub in ("img_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for p in sorted((full / sub).iterdir(), key=lambda p: int(p.stem.rsplit("_", 1)[1]))[:shards]:
            if not (root / sub / p.name).exists():
                os.symlink(p, root / sub / p.name)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def cli(*args: object, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coder_index_cli.main", *map(str, args)], check=True,
                          capture_output=True, text=True, **kw)


def peak_memory(cmd: list[str], cwd: Path) -> dict[str, float]:
    """Peak RSS (VmHWM), and the peaks of its anonymous and file-backed parts sampled every 20 ms, MB."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks = {"anon": 0.0, "file": 0.0}

    def sample() -> None:
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                break
            for line in status.splitlines():
                if line.startswith("RssAnon:"):
                    peaks["anon"] = max(peaks["anon"], int(line.split()[1]) / 1024)
                elif line.startswith("RssFile:"):
                    peaks["file"] = max(peaks["file"], int(line.split()[1]) / 1024)
                elif line.startswith("VmHWM:"):
                    peaks["hwm"] = int(line.split()[1]) / 1024
            time.sleep(0.02)

    t = threading.Thread(target=sample)
    t0 = time.perf_counter()
    t.start()
    _, err = proc.communicate()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {err[-2000:]}")
    return {"peak_rss_mb": round(peaks.get("hwm", 0.0), 1), "peak_anon_mb": round(peaks["anon"], 1),
            "peak_file_mb": round(peaks["file"], 1), "seconds": round(time.perf_counter() - t0, 1)}


def images(folder: Path, n: int) -> None:
    from PIL import Image

    if folder.exists() and len(list(folder.iterdir())) >= n:
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / f"{i:05d}.jpg")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--subset-rows", type=int, default=1_000_000)
    ap.add_argument("--shard-rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--factory", default="auto", help="FAISS factory, or auto: chosen from each corpus's rows")
    ap.add_argument("--train", type=int, default=65_536)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-xmore"))
    ap.add_argument("--service", action="store_true", help="also measure clip-retrieval's back-end")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"rows": args.rows, "dim": args.dim, "nprobe": args.nprobe, "factory": {}}

    from tiny_model import TINY_CONFIG, write_tiny_model

    cfg = json.loads(json.dumps(TINY_CONFIG))
    cfg["model_cfg"]["embed_dim"] = args.dim  # the towers stay tiny; the embeddings are LAION-wide
    model_dir = work / "model"
    model = f"local-dir:{model_dir}" if (model_dir / "open_clip_config.json").exists() else \
        write_tiny_model(model_dir, seed=0, config=cfg)
    if not (work / "idx").exists():
        (work / "classes.txt").write_text("\n".join(WORDS) + "\n")
        cli("build", work / "idx", "--classes", work / "classes.txt", "--model", model, "--llm", "none", "-q")

    t0 = time.perf_counter()
    generate(work / "laion-full", args.rows, args.shard_rows, args.dim)
    out["generate_seconds"] = round(time.perf_counter() - t0, 1)
    out["embeddings_bytes"] = du(work / "laion-full")
    subset(work / f"laion-{args.subset_rows}", work / "laion-full", args.subset_rows // args.shard_rows)
    sizes = {"full": (work / "laion-full", args.rows), "subset": (work / f"laion-{args.subset_rows}",
                                                                  args.subset_rows)}

    from coder_index import TextIndex
    from coder_index.methods.xmore.predict import XMore
    from coder_index.stores.corpus import Corpus

    index = TextIndex.open(work / "idx")
    clusters = np.load(work / "clusters.npy", mmap_mode="r")
    rng = np.random.default_rng(5)
    ingest = {}
    for name, (folder, rows) in sizes.items():
        corpus_dir = work / f"corpus-{name}"
        factory = auto_factory(rows) if args.factory == "auto" else args.factory
        out["factory"][name] = factory
        if not corpus_dir.exists():
            t0 = time.perf_counter()
            cli("corpus", "build", corpus_dir, "--embeddings", folder, "--reference", "--index-factory", factory,
                "--nprobe", args.nprobe,
                "--train-size", args.train, "--index", work / "idx", "-q")
            ingest[name] = {"seconds": round(time.perf_counter() - t0, 1), "bytes_written": du(corpus_dir),
                            "rows": rows}
        corpus = Corpus(corpus_dir)
        corpus.set_nprobe(args.nprobe)
        q_rows = np.sort(rng.choice(rows, args.queries, replace=False))
        # a corpus image seen again, a little changed (noise of norm 0.1)
        q = corpus.folder.vectors(q_rows) + (0.1 / np.sqrt(args.dim)) * rng.standard_normal(
            (args.queries, args.dim)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        corpus.index.search(q, 16)  # the pages these queries read, into the page cache: both timings warm
        t0 = time.perf_counter()
        corpus.index.search(q, 16)  # FAISS alone: the pages it reads stay resident
        raw_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, ids = corpus.search(q, 16)  # the corpus: 64 queries at a time, their pages released after each
        search_s = time.perf_counter() - t0
        out[f"{name}_retrieved_from_the_query_images_cluster"] = round(float(
            np.mean(np.asarray(clusters[np.clip(ids, 0, None).ravel()]).reshape(ids.shape)
                    == np.asarray(clusters[q_rows])[:, None])), 4)
        xmore = XMore(index, corpus, k=16)
        xmore.modality_probs(q[:10], "clip")
        t0 = time.perf_counter()
        xmore.modality_probs(q, "clip")
        path_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        xmore.modality_probs(q, "clip")  # again: every caption now in the text cache
        cached_s = time.perf_counter() - t0
        out[f"{name}_queries_per_s"] = {"search_k16": round(args.queries / search_s, 1),
                                        "search_k16_faiss_alone": round(args.queries / raw_s, 1),
                                        "xmore_caption_path": round(args.queries / path_s, 1),
                                        "xmore_caption_path_cached": round(args.queries / cached_s, 1)}
        if name == "subset":  # exact search over the 1M rows, in RAM, for recall
            import faiss

            exact = faiss.IndexFlatIP(args.dim)
            for s in range(0, rows, 200_000):
                exact.add(corpus.folder.vectors(np.arange(s, min(s + 200_000, rows))))
            truth = exact.search(q, 16)[1]
            del exact
            out["recall_at_16_subset"] = round(float(np.mean([len(set(a) & set(b)) / 16
                                                              for a, b in zip(ids, truth, strict=True)])), 4)
        corpus.close()
    out["ingest_by_reference"] = ingest

    images(work / "images", args.queries)
    memory = {"coder (the model and pipeline alone)": peak_memory(
        [sys.executable, "-m", "coder_index_cli.main", "classify", "images", "--index", "idx", "--out",
         "m-coder.csv", "--overwrite", "--workers", "0", "-q"], work)}
    for name in ("subset", "full"):
        memory[f"xmore over {sizes[name][1]:,} rows"] = peak_memory(
            [sys.executable, "-m", "coder_index_cli.main", "classify", "images", "--index", "idx", "--corpus",
             f"corpus-{name}", "--method", "xmore", "--out", f"m-{name}.csv",
             "--overwrite", "--workers", "0", "-q"], work)
    out["classify_memory"] = memory
    if args.service:
        out["service"] = service_speed(work, model_dir, args)
    print(json.dumps(out, indent=2))


def service_speed(work: Path, model_dir: Path, args: argparse.Namespace) -> dict:
    """clip-retrieval's back-end over the first 100,000 rows (Flat, autofaiss) against the same rows
    searched here (Flat, by reference): queries/s at K=16."""
    import shutil

    from knn_back import make_indice, running_back

    rows = 100_000
    root = work / "service"
    folder = work / "laion-full"
    if not (root / "indice" / "image.index").exists():
        (root / "emb").mkdir(parents=True, exist_ok=True)
        x = np.load(folder / "img_emb" / "img_emb_0.npy", mmap_mode="r")[:rows].astype(np.float32)
        np.save(root / "emb" / "img_emb_0.npy", x)
        import pyarrow.parquet as pq

        (root / "indice" / "metadata").mkdir(parents=True, exist_ok=True)
        (root / "ref" / "img_emb").mkdir(parents=True, exist_ok=True)
        (root / "ref" / "metadata").mkdir(parents=True, exist_ok=True)
        table = pq.read_table(folder / "metadata" / "metadata_0.parquet").slice(0, rows)
        pq.write_table(table, root / "indice" / "metadata" / "metadata_0.parquet")
        shutil.copy(root / "indice" / "metadata" / "metadata_0.parquet", root / "ref" / "metadata")
        np.save(root / "ref" / "img_emb" / "img_emb_0.npy", x.astype(np.float16))
        make_indice(root / "emb", root / "indice", timeout=3600)
    (root / "indices.json").write_text(json.dumps({"bench": str(root / "indice")}))
    if not (root / "corpus").exists():
        cli("corpus", "build", root / "corpus", "--embeddings", root / "ref", "--reference", "--index", work / "idx",
            "-q")
    with running_back(root / "indices.json", str(model_dir)) as port:
        from coder_index.stores.corpus import Corpus

        remote = Corpus(f"http://127.0.0.1:{port}/knn-service?indice=bench")
        local = Corpus(root / "corpus")
        rng = np.random.default_rng(9)
        q = rng.standard_normal((args.queries, args.dim)).astype(np.float32)
        result = {"rows": rows}
        for name, corpus in (("service", remote), ("local_by_reference", local)):
            corpus.search(q[:5], 16)
            t0 = time.perf_counter()
            _, ids = corpus.search(q, 16)
            result[f"{name}_queries_per_s"] = round(args.queries / (time.perf_counter() - t0), 1)
            result[f"{name}_ids"] = ids
        # both are exact; the service searches one query at a time (FAISS's sequential kernel), this
        # process in batches (BLAS): near-ties at the 16th place may swap
        a, b = result.pop("service_ids"), result.pop("local_by_reference_ids")
        result["same_neighbours_fraction"] = round(float(np.mean([len(set(x) & set(y)) / 16
                                                                  for x, y in zip(a, b, strict=True)])), 4)
        result["same_first_neighbour_fraction"] = round(float(np.mean(a[:, 0] == b[:, 0])), 4)
        return result


if __name__ == "__main__":
    main()
