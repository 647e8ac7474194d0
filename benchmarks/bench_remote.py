"""The same webdataset shards classified from the local disk, from a local HTTP server and from an
S3-compatible server (moto's server mode), side by side in one run: images/s of each as a ratio to
the local run, and the peak resident memory of each run (the classify process and its decoding
workers together, sampled every 0.2 s).

The shards are made of ../shared/data/imagenet-samples (real photos, ~100 KB each) repeated until
they hold --gb of images, --per-shard samples each. The default model is the tests' tiny open_clip
model (random weights), so that reading and decoding, not the model, set the pace: the hardest case
for remote reads. --model ViT-B-32 uses the real architecture (random weights).

    python benchmarks/bench_remote.py                  # 1 GB of shards, tiny model, 2 workers
    python benchmarks/bench_remote.py --gb 0.1 --runs 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' servers and tiny model


def make_shards(photos: list[Path], out: Path, gb: float, per_shard: int) -> tuple[list[Path], int, int]:
    out.mkdir(parents=True, exist_ok=True)
    data = [(p.stem, p.read_bytes()) for p in photos]
    budget, total, n, shards = gb * 1e9, 0, 0, []
    while total < budget:
        path = out / f"{len(shards):05d}.tar"
        with tarfile.open(path, "w") as tf:
            for _ in range(per_shard):
                key, blob = data[n % len(data)]
                info = tarfile.TarInfo(f"{n:08d}_{key}.jpg")
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
                cap = f"a photo of {key.split('_', 1)[-1]}".encode()
                info = tarfile.TarInfo(f"{n:08d}_{key}.txt")
                info.size = len(cap)
                tf.addfile(info, io.BytesIO(cap))
                total += len(blob)
                n += 1
                if total >= budget:
                    break
        shards.append(path)
    return shards, n, total


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    total, todo = 0, [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, ValueError):
            pass
        todo += children.get(p, [])
    return total


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, err = proc.communicate()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])}... failed:\n{err[-3000:]}")
    return time.perf_counter() - t0, peak[0], err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--model", default="tiny", help="tiny (the tests' model) or an open_clip name (random weights)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runs", type=int, default=1, help="rounds of the three sources, alternating")
    ap.add_argument("--out", type=Path, default=Path("bench-out/bench_remote.json"))
    args = ap.parse_args()

    from http_server import FileServer
    from s3_server import s3_fs, s3_server

    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    photos = sorted((args.shared / "data" / "imagenet-samples").glob("*.JPEG"))
    shards, n_images, n_bytes = make_shards(photos, work / "shards", args.gb, args.per_shard)
    print(f"{len(shards)} shards, {n_images} images, {n_bytes / 1e9:.2f} GB of JPEGs", flush=True)
    base = {**os.environ, "HF_HUB_OFFLINE": "1", "CODER_INDEX_CACHE_DIR": str(work / "cache"),
            "PYTHONPATH": str(REPO)}
    if args.model == "tiny":
        from tiny_model import write_tiny_model

        model, pretrained = write_tiny_model(work / "model", seed=0), []
    else:
        model, pretrained = args.model, ["--pretrained", "random"]
    (work / "classes.txt").write_text("fish\nbird\ndog\ncat\n")
    cli = [sys.executable, "-m", "coder_index_cli.main"]
    subprocess.run(cli + ["build", str(work / "idx"), "--classes", str(work / "classes.txt"), "--model", model,
                          *pretrained, "-q"], check=True, env=base, cwd=work, stdout=subprocess.DEVNULL)
    last = f"{len(shards) - 1:05d}"
    results: dict[str, list[dict]] = {"local": [], "http": [], "s3": []}
    with FileServer(work / "shards") as http, s3_server() as s3:
        fs = s3_fs(s3)
        fs.mkdir("bench")
        for s in shards:
            fs.put_file(str(s), f"bench/{s.name}")
        sources = {"local": str(work / "shards" / f"{{00000..{last}}}.tar"),
                   "http": http.base_url + f"/{{00000..{last}}}.tar",
                   "s3": f"s3://bench/{{00000..{last}}}.tar"}
        for r in range(args.runs):
            for name, spec in sources.items():
                out = work / f"{name}-{r}.csv"
                cmd = cli + ["classify", spec, "--index", str(work / "idx"), "--out", str(out), "--workers",
                             str(args.workers), "--batch-size", "64", "-q"]
                seconds, peak, _ = timed(cmd, {**base, **s3}, work)
                rows = sum(1 for _ in open(out)) - 1
                assert rows == n_images, (name, rows, n_images)
                results[name].append({"seconds": round(seconds, 2), "img_s": round(rows / seconds, 1),
                                      "peak_rss_mb": round(peak / 2**20, 1)})
                print(f"run {r + 1} {name}: {rows} images in {seconds:.1f} s ({rows / seconds:.1f} img/s), peak "
                      f"RSS {peak / 2**20:.0f} MB", flush=True)
    best = {k: max(v, key=lambda x: x["img_s"]) for k, v in results.items()}
    peak = {k: max(x["peak_rss_mb"] for x in v) for k, v in results.items()}
    summary = {"images": n_images, "gb": round(n_bytes / 1e9, 3), "shards": len(shards), "model": args.model,
               "workers": args.workers, "runs": results,
               "ratio_to_local": {k: round(best[k]["img_s"] / best["local"]["img_s"], 3) for k in ("http", "s3")},
               "peak_rss_mb": peak,
               "peak_rss_over_local_mb": {k: round(peak[k] - peak["local"], 1) for k in ("http", "s3")}}
    print(json.dumps(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
