"""Issue-12 figures: memory, reruns, candidate search and the Ray engine at scale. Every measured
run is a fresh process; figures are printed and saved as JSON, never asserted.

    python benchmarks/bench_scale.py rss --texts 100000 1000000
    python benchmarks/bench_scale.py noop --files 100000 1000000
    python benchmarks/bench_scale.py candidates --classes 100000
    python benchmarks/bench_scale.py ray --images 2000
    python benchmarks/bench_scale.py textenc --old /tmp/old   # git worktree add /tmp/old 83e2c63
    python benchmarks/bench_scale.py all

* rss: peak RSS of a process that opens a K-text, 512-wide index (ViT-B-32, random weights; random
  unit vectors stand in for encoded texts) and classifies 256 images with ``coder-index classify``
  (run in process), against the goal 1.3 x K x D x 4 bytes + 1 GB. ``--code DIR`` measures another
  checkout of coder-index (before/after).
* noop: a finished run rerun with nothing left to do, through the CLI, over N hard links to one
  small image (1,000 per folder), in microseconds per file.
* candidates: --candidates M against the dense stage 1 at C classes with synthetic clustered
  embeddings (random weights make every text alike, so the vectors are generated: super-clusters of
  classes, texts and images around class centres): top-1 agreement and speed-up.
* ray: the same images classified by the local engine and by the Ray engine (a local Ray instance on
  this machine), rows compared, wall times side by side.
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
SHARED = REPO.parent / "shared" / "data"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}

MAKE_INDEX = r"""
import sys, numpy as np
from pathlib import Path
from coder_index import ClipEncoder, TextIndex
from coder_index.core.records import TextItem
from coder_index.core.presets import TextRecipe
path, k, per_class = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
enc = ClipEncoder("ViT-B-32", "random", device="cpu")
index = TextIndex.create(path, enc, recipe=TextRecipe.make())
n_classes = k // per_class
names = [f"class {i}" for i in range(n_classes)]
index.add_classes(names)
rng = np.random.default_rng(0)
step = 200_000
for s in range(0, k, step):
    ids = np.arange(s, min(s + step, k))
    items = [TextItem(names[i % n_classes], "name" if i < n_classes else "attribute", f"text {i}", source="bench")
             for i in ids]
    emb = rng.standard_normal((len(ids), enc.embed_dim), dtype=np.float32)
    index.add_texts(items, embeddings=emb)
print(index.counts())
"""

OPEN_AND_CLASSIFY = r"""
import json, resource, sys, time
from coder_index_cli.main import cli
index_dir, folder, out = sys.argv[1:4]
t = time.perf_counter()
try:  # the command a user runs: open the index, classify, write rows
    cli(["classify", folder, "--index", index_dir, "--out", out, "--device", "cpu", "-q"], standalone_mode=True)
except SystemExit as e:
    if e.code:
        raise
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _images(dst: Path, n: int) -> Path:
    """n CIFAR-10 test images (links), a tenth per class."""
    src = SHARED / "cifar10-test"
    if dst.exists():
        return dst
    for c in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / c.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(c.iterdir())[: n // 10]:
            os.symlink(f, dst / c.name / f.name)
    return dst


def bench_rss(texts: list[int], code: Path, tmp: Path) -> list[dict]:
    """Peak RSS per K. The smallest K is the baseline: what the process costs with (almost) no texts (torch,
    open_clip, the model, 256 images) - the fixed cost; the rest of each row is what K adds."""
    images = _images(tmp / "rss-images", 256)
    results = []
    for k in sorted(texts):
        index_dir = tmp / f"rss-index-{k}"
        if not index_dir.exists():
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", MAKE_INDEX, str(index_dir), str(k), "10"], check=True, env=ENV,
                           capture_output=True)
            print(f"made a {k}-text index in {time.perf_counter() - t:.0f}s", flush=True)
        env = {**ENV, "PYTHONPATH": str(code)}
        out = subprocess.run([sys.executable, "-c", OPEN_AND_CLASSIFY, str(index_dir), str(images),
                              str(tmp / f"rss-{k}-{time.time_ns()}.csv")], check=True, env=env, capture_output=True,
                             text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        matrix = k * 512 * 4
        fixed = results[0]["peak_rss_bytes"] if results else r["peak_rss_bytes"]
        r.update({"texts": k, "code": str(code), "matrix_bytes": matrix,
                  "goal_bytes": int(1.3 * matrix + (1 << 30)),
                  "within_goal": r["peak_rss_bytes"] <= 1.3 * matrix + (1 << 30),
                  "fixed_bytes (smallest K)": fixed,
                  "k_dependent_over_matrix": round((r["peak_rss_bytes"] - fixed) / matrix, 3)})
        print(json.dumps(r), flush=True)
        results.append(r)
    return results


MAKE_NOOP_RUN = r"""
import json, os, sys
from pathlib import Path
from PIL import Image
from coder_index.pipeline.output import ResultWriter
tmp, n = Path(sys.argv[1]), int(sys.argv[2])
imgs = tmp / "imgs"
src = None
for i in range(n):
    if i % 60_000 == 0:  # ext4 allows 65,000 links to one inode
        src = tmp / f"src{i}.png"
        Image.new("RGB", (8, 8), (i % 255, 2, 3)).save(src)
    d = imgs / f"d{i // 1000:05d}"
    if i % 1000 == 0:
        d.mkdir(parents=True)
    os.link(src, d / f"{i:08d}.png")
"""

APPEND_ROWS = r"""
import sys
from pathlib import Path
from coder_index.pipeline.output import ResultWriter
out, prefix, n, labels = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")
w = ResultWriter(out, 5)
rows = []
for i in range(1000, n):  # the first folder was classified for real; the rest is written as a run would
    rows.append({"path": f"{prefix}d{i // 1000:05d}/{i:08d}.png", "label": labels[0], "score": 0.5,
                 "method": "coder", "top_k": [{"label": c, "score": 0.1} for c in labels]})
    if len(rows) == 100_000:
        w.write(rows)
        rows = []
w.write(rows)
w.close()
"""


def bench_noop(files: list[int], tmp: Path) -> list[dict]:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_model import write_tiny_model

    model = write_tiny_model(tmp / "tiny")
    labels = ["cat", "dog", "car", "ship", "tree"]
    (tmp / "classes.txt").write_text("\n".join(labels) + "\n")
    subprocess.run(["coder-index", "build", str(tmp / "noop-index"), "--classes", str(tmp / "classes.txt"),
                    "--model", model, "-q"], check=True, env=ENV, capture_output=True)
    results = []
    for n in files:
        work = tmp / f"noop-{n}"
        work.mkdir()
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", MAKE_NOOP_RUN, str(work), str(n)], check=True, env=ENV)
        print(f"{n} hard links in {time.perf_counter() - t:.0f}s", flush=True)
        out = work / "preds.csv"
        cmd = ["coder-index", "classify", str(work / "imgs"), "--index", str(tmp / "noop-index"), "--out", str(out),
               "-q"]
        subprocess.run(cmd[:2] + [str(work / "imgs" / "d00000")] + cmd[3:], check=True, env=ENV, capture_output=True)
        prefix = (work / "imgs").as_posix() + "/"
        subprocess.run([sys.executable, "-c", APPEND_ROWS, str(out), prefix, str(n), ",".join(labels)], check=True,
                       env=ENV)
        t = time.perf_counter()
        r = subprocess.run(cmd, check=True, env=ENV, capture_output=True, text=True)
        wall = time.perf_counter() - t
        t = time.perf_counter()
        subprocess.run(["coder-index", "--help"], check=True, env=ENV, capture_output=True)
        startup = time.perf_counter() - t
        row = {"files": n, "wall_s": round(wall, 2), "us_per_file": round(wall / n * 1e6, 2),
               "us_per_file_without_startup": round((wall - startup) / n * 1e6, 2), "cli_startup_s": round(startup, 2),
               "summary": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.stdout.strip()}
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


def bench_candidates(n_classes: int, per_class: int, ms: list[int], n_images: int) -> dict:
    import numpy as np

    from coder_index.methods.candidates import CandidateClassifier
    from coder_index.methods.coder import CoderClassifier

    rng = np.random.default_rng(0)
    d = 512

    def unit(a):
        return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)

    def noise(n):
        return unit(rng.standard_normal((n, d), dtype=np.float32))

    # 50 classes per super-cluster: neighbours are close, so the dense top-1 is often a near tie
    sup = noise(n_classes // 50)
    centre = unit(sup[np.arange(n_classes) % len(sup)] + 0.5 * noise(n_classes))
    k = n_classes * (2 + per_class)
    cls = np.concatenate([np.arange(n_classes), np.arange(n_classes), np.repeat(np.arange(n_classes), per_class)])
    kind = np.array(["name"] * n_classes + ["synonym"] * n_classes + ["attribute"] * (n_classes * per_class))
    w = np.empty((k, d), np.float32)
    for s in range(0, k, 100_000):
        w[s:s + 100_000] = unit(centre[cls[s:s + 100_000]] + 1.5 * noise(min(100_000, k - s)))
    true = rng.integers(0, n_classes, n_images)
    x = unit(centre[true] + 2.5 * noise(n_images))
    dense_clf = CoderClassifier(w, cls, kind, n_classes)
    t = time.perf_counter()
    dense = dense_clf.logits(x, normalized=True).argmax(1)
    dense_s = time.perf_counter() - t
    out = {"classes": n_classes, "texts": k, "images": n_images, "dense_s": round(dense_s, 3),
           "dense_top1_vs_truth": float((dense == true).mean()), "m": []}
    for m in ms:
        t = time.perf_counter()
        cc = CandidateClassifier(dense_clf, m)
        setup_s = time.perf_counter() - t
        t = time.perf_counter()
        pred = cc.logits(x, normalized=True).argmax(1)
        s = time.perf_counter() - t
        row = {"m": m, "agreement": float((pred == dense).mean()), "seconds": round(s, 3),
               "speedup": round(dense_s / s, 2), "setup_s": round(setup_s, 2)}
        print(json.dumps(row), flush=True)
        out["m"].append(row)
    return out


RAY_RUN = r"""
import json, sys, time
from coder_index import TextIndex
from coder_index.pipeline.classify import classify_folder
from coder_index.methods.scorer_spec import ScorerSpec, build_scorer
index_dir, folder, out, engine = sys.argv[1:5]
index = TextIndex.open(index_dir, device="cpu")
spec = ScorerSpec(top_k=5)
eng = None
if engine == "ray":
    from coder_index.engines.ray_engine import RayEngine
    eng = RayEngine(index, spec, progress=False)
t = time.perf_counter()
s = classify_folder(index, folder, out, scorer=build_scorer(index, spec), progress=False, engine=eng)
print(json.dumps({"engine": engine, "images": s.classified, "seconds": round(time.perf_counter() - t, 2)}))
"""


def bench_ray(n_images: int, tmp: Path, model: str) -> dict:
    images = _images(tmp / "ray-images", n_images)
    classes = SHARED / "classnames" / "ImageNet.txt"
    index_dir = tmp / "ray-index"
    pretrained = [] if model.startswith("local-dir:") else ["--pretrained", "random"]
    subprocess.run(["coder-index", "build", str(index_dir), "--classes", str(classes), "--model", model,
                    *pretrained, "-q"], check=True, env=ENV, capture_output=True)
    rows = {}
    runs = []
    for engine in ("local", "ray"):
        out = tmp / f"ray-{engine}.csv"
        r = subprocess.run([sys.executable, "-c", RAY_RUN, str(index_dir), str(images), str(out), engine], check=True,
                           env=ENV, capture_output=True, text=True)
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)
        rows[engine] = sorted(out.read_text().splitlines())
    local_s, ray_s = runs[0]["seconds"], runs[1]["seconds"]
    return {"model": model, "images": n_images, "runs": runs, "rows_equal": rows["local"] == rows["ray"],
            "ray_over_local": round(ray_s / local_s, 2),
            "per_image_ms_local": round(local_s / n_images * 1000, 2)}


TEXT_ENCODE = r"""
import json, sys, time, types
import torch
from coder_index.model.encoder import ClipEncoder
from coder_index import TextIndex
texts = json.load(open(sys.argv[1]))
batch = None if sys.argv[2] == "default" else int(sys.argv[2])
enc = ClipEncoder("ViT-B-32", "random", device="cpu")
t = time.perf_counter(); tokens = enc.tokenize(texts); tok_s = time.perf_counter() - t
t = time.perf_counter()
emb = TextIndex._encode_with_progress(types.SimpleNamespace(encoder=enc), texts, batch, "encoding")
s = time.perf_counter() - t
print(json.dumps({"texts": len(texts), "seconds": round(s, 2), "texts_per_s": round(len(texts) / s, 1),
                  "tokenize_share": round(tok_s / s, 3), "threads": torch.get_num_threads(),
                  "checksum": float(abs(emb).sum())}))
"""


def _vocabulary_sample(n: int) -> list[str]:
    """n texts drawn from a 20,000-class vocabulary: WordNet nouns as classes, a name text and three
    attribute texts (published ImageNet descriptors) per class, as a build makes them."""
    import random

    nouns = [line.split()[0].replace("_", " ") for line in open("/usr/share/wordnet/index.noun")
             if not line.startswith(" ")]
    classes = nouns[:: max(1, len(nouns) // 20_000)][:20_000]
    desc = [d for v in json.loads((SHARED / "descriptors" / "descriptors_imagenet.json").read_text()).values()
            for d in v]
    rng = random.Random(0)
    texts = []
    for c in classes:
        texts.append(f"a photo of a {c}.")
        texts += [f"a photo of a {c}, which {d}." for d in rng.sample(desc, 3)]
    return rng.sample(texts, n)


def bench_text_encoding(n: int, old: Path, tmp: Path, rounds: int = 2) -> dict:
    """Texts/s of the build's encoding step (TextIndex._encode_with_progress) at 20,000 classes with
    ViT-B-32 (random weights, same cost as real ones), old and new code alternately in fresh processes."""
    sample = tmp / "texts.json"
    sample.write_text(json.dumps(_vocabulary_sample(n)))
    runs = {"before": [], "after": []}
    for _ in range(rounds):
        for name, code, batch in (("before", old, "256"), ("after", REPO, "default")):
            r = subprocess.run([sys.executable, "-c", TEXT_ENCODE, str(sample), batch], check=True, capture_output=True,
                               text=True, env={**ENV, "PYTHONPATH": str(code)})
            runs[name].append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(name, json.dumps(runs[name][-1]), flush=True)
    best = {k: max(r["texts_per_s"] for r in v) for k, v in runs.items()}
    return {"texts": n, "runs": runs, "best_texts_per_s": best, "speedup": round(best["after"] / best["before"], 2),
            "same_embeddings": abs(runs["before"][0]["checksum"] - runs["after"][0]["checksum"]) < 1e-2 * n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["rss", "noop", "candidates", "ray", "textenc", "all"])
    ap.add_argument("--texts", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
    ap.add_argument("--code", type=Path, default=REPO, help="checkout of coder-index to measure (rss)")
    ap.add_argument("--files", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--classes", type=int, default=100_000)
    ap.add_argument("--texts-per-class", type=int, default=8, help="attribute texts per class (plus 2 names)")
    ap.add_argument("--m", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--query-images", type=int, default=2000)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--model", default="ViT-B-32", help="model for the Ray comparison (random weights)")
    ap.add_argument("--old", type=Path, default=None, help="textenc: a checkout of the code before (git worktree)")
    ap.add_argument("--sample", type=int, default=4096, help="textenc: texts encoded per run")
    ap.add_argument("--tmp", type=Path, default=None, help="scratch folder (default: a new temp folder)")
    ap.add_argument("--out", type=Path, default=REPO / "bench-out" / "bench_scale.json")
    args = ap.parse_args()
    tmp = args.tmp or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    tmp.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.what in ("rss", "all"):
        results["rss"] = bench_rss(args.texts, args.code.resolve(), tmp)
    if args.what in ("noop", "all"):
        results["noop"] = bench_noop(args.files, tmp)
    if args.what in ("candidates", "all"):
        results["candidates"] = bench_candidates(args.classes, args.texts_per_class, args.m, args.query_images)
    if args.what in ("ray", "all"):
        results["ray"] = bench_ray(args.images, tmp, args.model)
        print(json.dumps(results["ray"]))
    if args.what == "textenc":
        if args.old is None:
            ap.error("textenc needs --old DIR: e.g. git worktree add /tmp/old 83e2c63")
        results["text_encoding"] = bench_text_encoding(args.sample, args.old.resolve(), tmp)
        print(json.dumps({k: v for k, v in results["text_encoding"].items() if k != "runs"}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
