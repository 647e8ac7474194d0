"""Issue-13 figures: the per-image path on a GPU, side by side in one run. Figures are printed and saved
as JSON, never asserted.

    python benchmarks/bench_gpu.py                 # on a machine with CUDA (the `gpu` extra for FAISS GPU)
    python benchmarks/bench_gpu.py --smoke         # small sizes, any machine (checks that it runs)

* pipeline: images/s of `classify_folder` (decode in workers, pinned memory, encode, CODER, top-k,
  rows written) against the image encoder alone on the same pre-made tensors, ViT-B-32 and ViT-L-14
  with random weights; GPU utilisation sampled with nvidia-smi during the pipeline run.
* coder: the CODER product + stage-1 reductions (``CoderClassifier.logits_on_device``) at N x K
  against a plain float32 GEMM of the same shape (TF32 off for both): the fraction of the GEMM rate.
  On the CPU it also times the former numpy path (an aligned copy and ``np.matmul``) beside torch.
* faiss: corpus search queries/s, FAISS on the GPU against FAISS on the CPU, over random unit rows.
* start: the command's fixed cost before its first images against `import torch` + reading the
  weights (``bench_start.py``, fresh processes, medians).
* rerank: ``rerank`` of N images x C classes with pair texts for every pair met, on the device and
  on the CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device, repeat: int = 3) -> float:
    fn()  # warm-up (kernels, caches, allocator)
    sync(dev)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(dev)
        best = min(best, time.perf_counter() - t)
    return best


def unit(a: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(a, dim=-1)


class GpuUtilisation:
    """Samples nvidia-smi's utilisation.gpu every 0.2 s while in the with-block."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()

    def __enter__(self) -> GpuUtilisation:
        def run() -> None:
            while not self._stop.is_set():
                try:
                    out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                         capture_output=True, text=True, timeout=5).stdout
                    self.samples.append(int(out.split()[0]))
                except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                    return
                self._stop.wait(0.2)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        s = self.samples
        return {"mean_percent": round(float(np.mean(s)), 1), "samples": len(s)} if s else {"mean_percent": None}


SAMPLES = REPO.parent / "shared" / "data" / "imagenet-samples"


def photo_folder(tmp: Path, n_images: int) -> Path:
    """``n_images`` real photos: hard links of the shared ImageNet samples (copies where links fail)."""
    import os
    import shutil

    folder = tmp / f"photos-{n_images}"
    if not folder.exists():
        samples = sorted(SAMPLES.glob("*.JPEG"))
        for i in range(n_images):
            d = folder / f"d{i // 1000:03d}"
            d.mkdir(parents=True, exist_ok=True)
            src, dst = samples[i % len(samples)], d / f"{i:06d}.jpg"
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
    return folder


def feed_alone(feed, folder: Path, batch: int, workers: int, dev: torch.device) -> float:
    """Images/s of a feed by itself: files to model-ready pixels on the device, nothing encoded."""
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))
    t = time.perf_counter()
    n = 0
    for b in feed.batches(folder, names, batch_size=batch, workers=workers):
        n += 0 if b.pixels is None else len(b.pixels)
    sync(dev)
    return n / (time.perf_counter() - t)


def bench_pipeline(model: str, n_images: int, batch: int, dev: torch.device, tmp: Path) -> dict:
    import os

    from coder_index import ClipEncoder, TextIndex
    from coder_index.core.parallelism import choose
    from coder_index.core.presets import TextRecipe
    from coder_index.core.records import TextItem
    from coder_index.pipeline.classify import StageClock, classify_folder
    from coder_index.pipeline.feed import ReferenceFeed, TensorFeed

    folder = photo_folder(tmp, n_images)
    t = time.perf_counter()
    enc = ClipEncoder(model, "random", device=str(dev))
    t_model = time.perf_counter() - t
    index_dir = tmp / f"index-{model}"
    if not index_dir.exists():
        index = TextIndex.create(index_dir, enc, recipe=TextRecipe.make())
        names = [f"class {i}" for i in range(1000)]
        index.add_classes(names)
        items = [TextItem(names[i % 1000], "name" if i < 1000 else "attribute", f"text {i}", source="bench")
                 for i in range(10_000)]
        emb = np.random.default_rng(1).standard_normal((10_000, enc.embed_dim), dtype=np.float32)
        index.add_texts(items, embeddings=emb)
    index = TextIndex.open(index_dir, encoder=enc)
    pixels = torch.randn(batch, 3, *enc.image_size)

    def encoder_alone() -> None:
        for _ in range(0, n_images, batch):
            enc.encode_image_batch(pixels)

    t_encoder = timed(encoder_alone, dev, repeat=2)
    cores = os.cpu_count() or 1
    workers = choose(enc).workers
    limits = {"encoder_alone_img_per_s": round(n_images / t_encoder, 1),
              "cpu_decode_one_process_per_core_img_per_s": round(
                  feed_alone(ReferenceFeed(enc.preprocess, dev), folder, batch, cores, dev), 1)}
    try:
        limits["tensor_decode_alone_img_per_s"] = round(
            feed_alone(TensorFeed(enc.preprocess, dev), folder, batch, max(1, workers), dev), 1)
    except (RuntimeError, ValueError) as exc:
        limits["tensor_decode_alone_img_per_s"] = f"not measured: {exc}"
    runs = {}
    for decode in ("cpu", "gpu"):
        out = tmp / f"out-{model}-{decode}-{time.time_ns()}.csv"
        with GpuUtilisation() as util:
            t = time.perf_counter()
            s = classify_folder(index, folder, out, batch_size=batch, progress=False, decode=decode)
            sync(dev)
            t_pipeline = time.perf_counter() - t
        runs[decode] = {"img_per_s": round(s.classified / t_pipeline, 1),
                        "over_encoder": round((s.classified / t_pipeline) / (n_images / t_encoder), 3),
                        "gpu_utilisation": util.summary()}
        # where the time goes: the same run again with the device synchronised between stages
        clock = StageClock(dev)
        t = time.perf_counter()
        classify_folder(index, folder, tmp / f"prof-{model}-{decode}-{time.time_ns()}.csv", batch_size=batch,
                        progress=False, decode=decode, clock=clock)
        total = time.perf_counter() - t
        runs[decode]["stage_seconds"] = {k: round(v, 2) for k, v in clock.seconds.items()}
        runs[decode]["stage_seconds"]["other"] = round(total - sum(clock.seconds.values()), 2)
    return {"model": model, "images": n_images, "batch": batch, "precision": enc.precision,
            "model_build_s": round(t_model, 2), **limits, "classify": runs}


def bench_start(dev: torch.device, tmp: Path, runs: int) -> dict:
    """The command's fixed cost before its first images (benchmarks/bench_start.py, fresh processes)."""
    out = tmp / "start.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_start.py"), "--device", dev.type,
                    "--runs", str(runs), "--workdir", str(tmp / "start"), "--out", str(out)], check=True)
    return json.loads(out.read_text())["median_seconds"]


def bench_agreement(dev: torch.device) -> dict:
    """The tensor feed against the reference on the 250 shared ImageNet photos: the largest pixel
    difference after preprocessing (normalised units), the lowest cosine between the two ViT-B-32
    embeddings (seeded weights), and how many zero-shot top-1 classes (1,000 ImageNet names) differ."""
    from coder_index import ClipEncoder
    from coder_index.pipeline.feed import ReferenceFeed, TensorFeed

    enc = ClipEncoder("ViT-B-32", "random", device=str(dev))
    names = sorted(p.name for p in SAMPLES.glob("*.JPEG"))
    got = {}
    for feed in (ReferenceFeed(enc.preprocess, dev), TensorFeed(enc.preprocess, dev)):
        px = {}
        for b in feed.batches(SAMPLES, names, batch_size=50, workers=0):
            px.update(zip(b.paths, b.pixels, strict=True))
        got[feed.name] = torch.stack([px[n] for n in names])
    diff = (got["gpu"] - got["cpu"]).abs()
    emb = {k: torch.from_numpy(enc.encode_image_batch(v)) for k, v in got.items()}
    cos = (emb["gpu"] * emb["cpu"]).sum(dim=1)
    classes = (REPO.parent / "shared" / "data" / "classnames" / "ImageNet.txt").read_text().splitlines()
    w = torch.from_numpy(enc.encode_texts([f"a photo of a {c}." for c in classes]))
    top1 = {k: (e @ w.T).argmax(dim=1) for k, e in emb.items()}
    return {"images": len(names), "max_pixel_diff": round(float(diff.max()), 4),
            "mean_pixel_diff": round(float(diff.mean()), 5), "max_pixel_diff_grey_levels":
                round(float(diff.max()) * 255 * 0.2613, 2),
            "min_cosine": round(float(cos.min()), 6), "mean_cosine": round(float(cos.mean()), 6),
            "top1_differ": int((top1["gpu"] != top1["cpu"]).sum())}


def bench_coder(n: int, k: int, n_classes: int, dev: torch.device) -> dict:
    from coder_index import CoderClassifier
    from coder_index.model.compute import exact_float32

    rng = np.random.default_rng(0)
    texts = rng.standard_normal((k, 512), dtype=np.float32)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    cls = np.concatenate([np.arange(n_classes), rng.integers(0, n_classes, k - n_classes)])
    kinds = np.array(["name"] * n_classes + ["attribute"] * (k - n_classes), dtype=object)
    clf = CoderClassifier(texts, cls, kinds, n_classes, device=dev)
    x = unit(torch.randn(n, 512, device=dev))
    w = unit(torch.randn(k, 512, device=dev))

    def gemm() -> None:
        with exact_float32():
            for s in range(0, n, 8192):
                x[s:s + 8192] @ w.T

    t_gemm = timed(gemm, dev)
    t_coder = timed(lambda: clf.logits_on_device(x, normalized=True), dev)
    flops = 2.0 * n * k * 512
    r = {"n": n, "k": k, "classes": n_classes, "device": str(dev), "chunk_rows": clf.chunk_rows,
         "text_rows": clf.text_rows, "gemm_tflops": round(flops / t_gemm / 1e12, 3),
         "coder_tflops": round(flops / t_coder / 1e12, 3), "coder_over_gemm": round(t_gemm / t_coder, 3)}
    if dev.type == "cpu":  # the former numpy path beside torch: kept only where faster
        xn = x.numpy()

        def numpy_gemm() -> None:
            for s in range(0, n, 4096):
                np.matmul(xn[s:s + 4096], texts.T)

        r["numpy_gemm_over_torch_gemm"] = round(t_gemm / timed(numpy_gemm, dev), 3)
    return r


def bench_faiss(rows: int, queries: int, k: int) -> dict:
    import faiss

    from coder_index.model import faiss_gpu

    rng = np.random.default_rng(0)
    base = rng.standard_normal((rows, 512), dtype=np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    q = base[rng.integers(0, rows, queries)] + 0.1 * rng.standard_normal((queries, 512), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    out = {"rows": rows, "queries": queries, "k": k}
    for factory in ("Flat", "IVF1024,SQ8"):
        index = faiss.index_factory(512, factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(base[: min(rows, 100_000)])
        index.add(base)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.nprobe = 16
        cpu = timed(lambda index=index: index.search(q, k), torch.device("cpu"), repeat=2)
        r = {"cpu_queries_per_s": round(queries / cpu)}
        why = faiss_gpu.gpu_support()
        if why is None:
            gpu_index = faiss_gpu.index_for_device(index, torch.device("cuda", 0))
            gpu = timed(lambda g=gpu_index: g.search(q, k), torch.device("cpu"), repeat=2)
            r.update({"gpu_queries_per_s": round(queries / gpu), "gpu_over_cpu": round(cpu / gpu, 2),
                      "same_top1": float((gpu_index.search(q, 1)[1] == index.search(q, 1)[1]).mean())})
        else:
            r["gpu"] = f"not measured: {why}"
        out[factory] = r
    return out


def bench_rerank(n: int, c: int, dev: torch.device) -> dict:
    """The rerank as classify runs it: the pair table built once from arrays (what
    ``TextIndex.pair_table`` gives: no dict per pair), then looked up and scored on the device; beside
    it the same on the CPU, and the table's build. Every image must get the same final class."""
    from coder_index.methods.pair_stage import top_pairs
    from coder_index.methods.rerank import rerank
    from coder_index.stores.pairs import PairTable

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 512), dtype=np.float32)
    logits = (rng.standard_normal((n, c)) * 3).astype(np.float32)
    pairs = np.array(sorted(top_pairs(logits, 5)), dtype=np.int64)
    per_pair = 3
    t = time.perf_counter()
    table = PairTable.from_arrays(np.repeat(pairs[:, 0], per_pair), np.repeat(pairs[:, 1], per_pair),
                                  rng.standard_normal((len(pairs) * per_pair, 512), dtype=np.float32), c)
    t_table = time.perf_counter() - t
    on_dev = torch.from_numpy(logits).to(dev)
    t_dev = timed(lambda: rerank(x, on_dev, table), dev, repeat=1)
    t_cpu = timed(lambda: rerank(x, logits, table), torch.device("cpu"), repeat=1)
    same = float((rerank(x, on_dev, table) == rerank(x, logits, table)).mean())
    return {"images": n, "classes": c, "pairs": len(pairs), "table_build_s": round(t_table, 2),
            "device": str(dev), "device_s": round(t_dev, 2), "cpu_s": round(t_cpu, 2),
            "cpu_over_device": round(t_cpu / max(t_dev, 1e-9), 1), "same_final_class": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="small sizes: check that everything runs (any machine)")
    ap.add_argument("--only", nargs="*", choices=["pipeline", "coder", "faiss", "rerank", "agreement", "start"])
    ap.add_argument("--rerank-size", nargs=2, type=int, default=None, metavar=("IMAGES", "CLASSES"),
                    help="rerank shape [default: 100,000 x 1,000; --smoke 2,000 x 200]")
    ap.add_argument("--images", type=int, default=None, help="photos for the pipeline [default 10,000; --smoke 128]")
    ap.add_argument("--tmp", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("bench-out/gpu.json"))
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tmp = args.tmp or Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    small = args.smoke
    want = set(args.only or ["agreement", "start", "pipeline", "coder", "faiss", "rerank"])
    results: dict = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
                     "torch": torch.__version__, "smoke": small}
    if dev.type != "cuda":
        print("no CUDA device: CPU figures only (the GPU ones are not measured)", flush=True)
    if "agreement" in want:
        results["agreement"] = bench_agreement(dev)
        print(json.dumps(results["agreement"]), flush=True)
    if "start" in want:
        results["start"] = bench_start(dev, tmp, runs=2 if small else 3)
        print(json.dumps(results["start"]), flush=True)
    if "coder" in want:
        results["coder"] = bench_coder(*((2048, 20_000, 2_000) if small else (65_536, 100_000, 10_000)), dev)
        print(json.dumps(results["coder"]), flush=True)
    if "rerank" in want:
        results["rerank"] = bench_rerank(*(args.rerank_size or ((2_000, 200) if small else (100_000, 1_000))), dev)
        print(json.dumps(results["rerank"]), flush=True)
    if "faiss" in want:
        results["faiss"] = bench_faiss(*((20_000, 1_000, 16) if small else (1_000_000, 10_000, 16)))
        print(json.dumps(results["faiss"]), flush=True)
    if "pipeline" in want:
        models = ["ViT-B-32"] if small else ["ViT-B-32", "ViT-L-14"]
        results["pipeline"] = [bench_pipeline(m, args.images or (128 if small else 10_000),
                                              64 if small else 512 if dev.type == "cuda" else 64, dev, tmp)
                               for m in models]
        print(json.dumps(results["pipeline"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
