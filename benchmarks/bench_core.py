"""Issue-2 benchmark: measured side by side in one run, ratios reported (no timed assertions).

1. text encoding: length-sorted, truncated batches vs open_clip's encode_text (ViT-B-32 text tower)
2. CODER + heuristic logits on N image embeddings against the ImageNet text set (names +
   descriptors), as images/s and as a fraction of this machine's float32 GEMM rate
3. `classify` end to end on CIFAR-10 test images vs the image encoder alone on the same tensors

ViT-B-32 runs with random weights ('random'): the compute is the real model's, predictions are not.

    python benchmarks/bench_core.py --shared ../shared [--n-images 10000] [--n-classify 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_text(encoder, sentences: list[str]) -> dict:
    tokens = encoder.tokenize(sentences)

    def reference():
        with torch.inference_mode():
            out = [encoder.model.encode_text(tokens[i:i + 256]) for i in range(0, len(sentences), 256)]
        return torch.nn.functional.normalize(torch.cat(out), dim=-1).numpy()

    ref = reference()
    ours = encoder.encode_texts(sentences)
    t_ref = best_of(reference, 2)
    t_ours = best_of(lambda: encoder.encode_texts(sentences), 2)
    return {"texts": len(sentences), "open_clip_s": round(t_ref, 3), "coder_index_s": round(t_ours, 3),
            "speedup": round(t_ref / t_ours, 2), "max_abs_diff": float(np.abs(ref - ours).max()),
            "mean_tokens": float((tokens.argmax(-1) + 1).float().mean())}


def bench_coder(text_emb: np.ndarray, text_class: np.ndarray, text_kind: np.ndarray, n_classes: int,
                n_images: int) -> dict:
    from coder_index import CoderClassifier, coder_features, heuristic_logits

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n_images, text_emb.shape[1])).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    clf = CoderClassifier(text_emb, text_class, text_kind, n_classes)
    w = clf.text_emb
    t_gemm = best_of(lambda: x @ w.T)
    t_coder = best_of(lambda: clf.logits(x, normalized=True))
    sub = slice(0, 500)
    agree = np.abs(clf.logits(x[sub]) - heuristic_logits(coder_features(x[sub], text_emb), text_class,
                                                         text_kind, n_classes)).max()
    flops = 2.0 * n_images * w.shape[0] * w.shape[1]
    return {"images": n_images, "texts": int(w.shape[0]), "dim": int(w.shape[1]), "classes": n_classes,
            "coder_logits_s": round(t_coder, 3), "images_per_s": round(n_images / t_coder, 1),
            "gemm_only_s": round(t_gemm, 3), "gemm_gflops": round(flops / t_gemm / 1e9, 1),
            "fraction_of_gemm_rate": round(t_gemm / t_coder, 3), "max_abs_diff_vs_public_api": float(agree)}


def bench_classify(encoder, shared: Path, n: int, workers: int) -> dict:
    from coder_index import TextIndex
    from coder_index.core.decode import load_image
    from coder_index.core.presets import TextRecipe
    from coder_index.pipeline.classify import classify_folder

    cifar = shared / "data" / "cifar10-test"
    classes = sorted(p.name for p in cifar.iterdir())
    tmp = Path(tempfile.mkdtemp(prefix="bench-classify-"))
    folder = tmp / "images"
    per = n // len(classes)
    files = []
    for c in classes:
        (folder / c).mkdir(parents=True)
        for f in sorted((cifar / c).iterdir())[:per]:
            os.symlink(f, folder / c / f.name)
            files.append(folder / c / f.name)
    index = TextIndex.create(tmp / "idx", encoder)
    index.add_classes(classes)
    index.add_texts(TextRecipe.make(dataset="cifar10").name_texts(classes))

    t0 = time.perf_counter()
    summary = classify_folder(index, folder, tmp / "out.csv", batch_size=64, workers=workers, progress=False)
    t_pipeline = time.perf_counter() - t0

    tensors = torch.stack([encoder.preprocess(load_image(f)) for f in files])
    t0 = time.perf_counter()
    for i in range(0, len(tensors), 64):
        encoder.encode_image_batch(tensors[i:i + 64])
    t_encoder = time.perf_counter() - t0
    return {"images": summary.classified, "workers": workers, "pipeline_s": round(t_pipeline, 2),
            "pipeline_images_per_s": round(summary.classified / t_pipeline, 1),
            "encoder_only_s": round(t_encoder, 2), "encoder_images_per_s": round(len(files) / t_encoder, 1),
            "pipeline_overhead": round(t_pipeline / t_encoder - 1, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    ap.add_argument("--n-images", type=int, default=10_000)
    ap.add_argument("--n-classify", type=int, default=2_000)
    ap.add_argument("--n-sentences", type=int, default=640)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench-out/bench_core.json"))
    ap.add_argument("--skip", nargs="*", default=[], choices=["text", "coder", "classify"])
    args = ap.parse_args()

    from coder_index import ClipEncoder

    encoder = ClipEncoder("ViT-B-32", "random", device="cpu")
    desc = json.loads((args.shared / "data" / "descriptors" / "descriptors_imagenet.json").read_text())
    names = [line.strip() for line in (args.shared / "data" / "classnames" / "ImageNet.txt").read_text().splitlines()
             if line.strip()]
    results = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}}
    sentences = [f"{c} which has {d}" for c, ds in desc.items() for d in ds]
    if "text" not in args.skip:
        rng = np.random.default_rng(0)
        pick = [sentences[i] for i in rng.choice(len(sentences), args.n_sentences, replace=False)]
        results["text_encoding"] = bench_text(encoder, pick)
        print(json.dumps(results["text_encoding"]), flush=True)
    if "coder" not in args.skip:
        name_list = [f"a photo of a {c}." for c in names]
        cls_of = {c: i for i, c in enumerate(names)}
        texts = name_list + sentences
        text_class = np.array(list(range(len(names))) + [cls_of[c] for c, ds in desc.items() for _ in ds])
        text_kind = np.array(["name"] * len(names) + ["attribute"] * len(sentences))
        t0 = time.perf_counter()
        emb = encoder.encode_texts(texts)
        results["imagenet_text_set_encoding_s"] = round(time.perf_counter() - t0, 1)
        results["coder"] = bench_coder(emb, text_class, text_kind, len(names), args.n_images)
        print(json.dumps(results["coder"]), flush=True)
    if "classify" not in args.skip:
        results["classify"] = bench_classify(encoder, args.shared, args.n_classify, args.workers)
        print(json.dumps(results["classify"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
