"""Inputs where large image sets live, measured side by side in one run (ratios; no timed assertions):

1. `classify` of N CIFAR-10 JPEGs as a folder vs the same images as 4 webdataset tar shards
   (read in place by the decoding workers);
2. the cost of `--save-embeddings` (clip-retrieval layout, float16) on the shard run.

Each configuration runs `repeats` times, alternating, and the best time is kept (this machine's
timings are noisy). The model is loaded once; every run starts from an empty output.

    python benchmarks/bench_inputs.py --shared ../shared [--n 2000] [--model ViT-B-32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tarfile
import tempfile
import time
from pathlib import Path


def make_inputs(shared: Path, n: int, root: Path) -> tuple[Path, list[str]]:
    cifar = shared / "data" / "cifar10-test"
    files = sorted(p for c in sorted(cifar.iterdir()) for p in sorted(c.iterdir()))[:n]
    folder = root / "folder"
    for f in files:
        (folder / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, folder / f.parent.name / f.name)
    shards = []
    per = (len(files) + 3) // 4
    for s in range(4):
        path = root / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tf:
            for f in files[s * per:(s + 1) * per]:
                key = f"{f.parent.name}_{f.stem}"
                for name, data in ((f"{key}.jpg", f.read_bytes()), (f"{key}.txt", f"a {f.parent.name}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        shards.append(str(path))
    return folder, shards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default="../shared")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()

    from coder_index import ClipEncoder, TextIndex
    from coder_index.core.presets import TextRecipe
    from coder_index.pipeline.classify import classify_folder
    from coder_index.pipeline.embeddings_out import EmbeddingSaver
    from coder_index.pipeline.sources.shards import ShardSource

    with tempfile.TemporaryDirectory(prefix="bench-inputs-") as tmp:
        root = Path(tmp)
        folder, shards = make_inputs(Path(args.shared), args.n, root)
        encoder = ClipEncoder(args.model, "random", device="cpu")
        index = TextIndex.create(root / "idx", encoder, recipe=TextRecipe.make("default", "cifar10"))
        classes = sorted(p.name for p in folder.iterdir())
        index.add_classes(classes)
        index.add_texts(index.recipe.name_texts(classes))
        index.images_only()

        def once(name: str, source, save: bool) -> float:
            out = root / f"{name}.csv"
            for p in root.glob(f"{name}.csv*"):
                p.unlink()
            shutil.rmtree(root / f"{name}-emb", ignore_errors=True)
            saver = EmbeddingSaver(root / f"{name}-emb", out=out, dim=encoder.embed_dim,
                                   model=encoder.fingerprint.to_dict()) if save else None
            t0 = time.perf_counter()
            s = classify_folder(index, source, out, batch_size=args.batch_size, workers=args.workers, progress=False,
                                save_embeddings=saver)
            dt = time.perf_counter() - t0
            assert s.classified == args.n, (name, s.classified)
            return dt

        configs = {"folder": (folder, False), "shards": (ShardSource(shards), False),
                   "shards + save-embeddings": (ShardSource(shards), True)}
        best = {k: float("inf") for k in configs}
        once("warm-up", folder, False)
        for _ in range(args.repeats):
            for name, (source, save) in configs.items():
                best[name] = min(best[name], once(name.replace(" ", ""), source, save))
        report = {"images": args.n, "model": f"{args.model} (random weights)", "repeats": args.repeats,
                  "seconds": {k: round(v, 2) for k, v in best.items()},
                  "images_per_second": {k: round(args.n / v, 1) for k, v in best.items()},
                  "shards_vs_folder_speed": round(best["folder"] / best["shards"], 3),
                  "save_embeddings_cost": round(best["shards + save-embeddings"] / best["shards"] - 1, 4)}
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
