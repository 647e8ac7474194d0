"""Every source kind over the same images, side by side in one run: images/s of `classify` as a ratio
to the folder (= 1.0), and the peak resident memory of each run (the classify process and its
decoding workers together, sampled every 0.2 s) beside the folder's.

The images are ../shared/data/imagenet-samples (real photos, ~110 KB each) repeated until they hold
--gb of JPEGs, laid out as: a folder; a file list of it; webdataset shards (--per-shard samples
each), plain and gzip-compressed, read in place, by `pipe:cat`, from a local HTTP server and from an
S3-compatible server (moto's server mode); one parquet file in img2dataset's layout (a `jpg` bytes
column, row groups of --row-group rows) read locally, by HTTP and from S3. The default model is the
tests' tiny open_clip model (random weights), so that reading and decoding, not the model, set the
pace: the hardest case for a source. --model ViT-B-32 uses the real architecture (random weights).

    python benchmarks/bench_sources.py                         # 1 GB, tiny model, 2 workers
    python benchmarks/bench_sources.py --gb 0.1 --runs 2 --only folder,parquet
"""

from __future__ import annotations

import argparse
import gzip
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

KINDS = ("folder", "files", "shards", "gz-shards", "pipe", "http-shards", "s3-shards", "parquet", "http-parquet",
         "s3-parquet")


def make_data(photos: list[Path], work: Path, gb: float, per_shard: int, row_group: int) -> tuple[int, int, int]:
    """The folder, the shards (plain and gzip) and one parquet file of the same images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = [(p.stem, p.read_bytes()) for p in photos]
    for sub in ("folder", "tar", "gz", "pq"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    budget, total, n, shards = gb * 1e9, 0, 0, 0
    writer = None
    batch: dict[str, list] = {"key": [], "jpg": [], "caption": []}

    def flush() -> None:
        nonlocal writer
        if not batch["key"]:
            return
        table = pa.table({"key": batch["key"], "jpg": pa.array(batch["jpg"], pa.binary()),
                          "caption": batch["caption"]})
        if writer is None:
            # no dictionary: the photos repeat, and parquet would store each distinct one once (a real set's
            # images are all distinct); JPEGs do not compress
            writer = pq.ParquetWriter(work / "pq" / "all.parquet", table.schema, use_dictionary=False,
                                      compression="none")
        writer.write_table(table, row_group_size=row_group)
        for v in batch.values():
            v.clear()

    while total < budget:
        path = work / "tar" / f"{shards:05d}.tar"
        with tarfile.open(path, "w") as tf:
            for _ in range(per_shard):
                key, blob = data[n % len(data)]
                key = f"{n:08d}_{key}"
                cap = f"a photo of {key.split('_', 2)[-1]}"
                for name, value in ((f"{key}.jpg", blob), (f"{key}.txt", cap.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(value)
                    tf.addfile(info, io.BytesIO(value))
                (work / "folder" / f"{key}.jpg").write_bytes(blob)
                for k, v in (("key", key), ("jpg", blob), ("caption", cap)):
                    batch[k].append(v)
                if len(batch["key"]) >= row_group:
                    flush()
                total += len(blob)
                n += 1
                if total >= budget:
                    break
        (work / "gz" / f"{shards:05d}.tar.gz").write_bytes(gzip.compress(path.read_bytes(), compresslevel=1))
        shards += 1
    flush()
    if writer is not None:
        writer.close()
    (work / "list.txt").write_text("".join(f"{p}\n" for p in sorted((work / "folder").iterdir())))
    return n, total, shards


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


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int]:
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
    return time.perf_counter() - t0, peak[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--row-group", type=int, default=500, help="rows per parquet row group")
    ap.add_argument("--model", default="tiny", help="tiny (the tests' model) or an open_clip name (random weights)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runs", type=int, default=1, help="rounds of every source, alternating")
    ap.add_argument("--only", default=",".join(KINDS), help="comma-separated source kinds (folder always runs)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/bench_sources.json"))
    args = ap.parse_args()

    from http_server import FileServer
    from s3_server import s3_fs, s3_server

    kinds = ["folder", *[k for k in args.only.split(",") if k in KINDS and k != "folder"]]
    work = Path(tempfile.mkdtemp(prefix="bench-sources-"))
    photos = sorted((args.shared / "data" / "imagenet-samples").glob("*.JPEG"))
    n_images, n_bytes, n_shards = make_data(photos, work, args.gb, args.per_shard, args.row_group)
    pq_size = (work / "pq" / "all.parquet").stat().st_size
    print(f"{n_images} images, {n_bytes / 1e9:.2f} GB of JPEGs: {n_shards} shards, a parquet file of "
          f"{pq_size / 1e9:.2f} GB", flush=True)
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
    last = f"{n_shards - 1:05d}"
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    with FileServer(work) as http, s3_server() as s3:
        if any(k.startswith("s3") for k in kinds):
            fs = s3_fs(s3)
            fs.mkdir("bench")
            for s in sorted((work / "tar").iterdir()):
                fs.put_file(str(s), f"bench/tar/{s.name}")
            fs.put_file(str(work / "pq" / "all.parquet"), "bench/pq/all.parquet")
        specs = {"folder": [str(work / "folder")], "files": ["--files-from", str(work / "list.txt")],
                 "shards": [str(work / "tar" / f"{{00000..{last}}}.tar")],
                 "gz-shards": [str(work / "gz" / f"{{00000..{last}}}.tar.gz")],
                 "pipe": [f"pipe:cat {work}/tar/{{00000..{last}}}.tar"],
                 "http-shards": [http.base_url + f"/tar/{{00000..{last}}}.tar"],
                 "s3-shards": [f"s3://bench/tar/{{00000..{last}}}.tar"],
                 "parquet": [str(work / "pq" / "all.parquet")], "http-parquet": [http.base_url + "/pq/all.parquet"],
                 "s3-parquet": ["s3://bench/pq/all.parquet"]}
        for r in range(args.runs):
            for name in kinds:
                out = work / f"{name}-{r}.csv"
                cmd = cli + ["classify", *specs[name], "--index", str(work / "idx"), "--out", str(out),
                             "--workers", str(args.workers), "--batch-size", "64", "-q"]
                seconds, peak = timed(cmd, {**base, **s3}, work)
                rows = sum(1 for _ in open(out)) - 1
                assert rows == n_images, (name, rows, n_images)
                results[name].append({"seconds": round(seconds, 2), "img_s": round(rows / seconds, 1),
                                      "peak_rss_mb": round(peak / 2**20, 1)})
                print(f"run {r + 1} {name}: {rows} images in {seconds:.1f} s ({rows / seconds:.1f} img/s), peak "
                      f"RSS {peak / 2**20:.0f} MB", flush=True)
    best = {k: max(v, key=lambda x: x["img_s"]) for k, v in results.items()}
    peak = {k: max(x["peak_rss_mb"] for x in v) for k, v in results.items()}
    summary = {"images": n_images, "gb": round(n_bytes / 1e9, 3), "shards": n_shards,
               "parquet_gb": round(pq_size / 1e9, 3), "row_group": args.row_group, "model": args.model,
               "workers": args.workers, "runs": results,
               "ratio_to_folder": {k: round(best[k]["img_s"] / best["folder"]["img_s"], 3) for k in kinds},
               "peak_rss_mb": peak,
               "peak_rss_over_folder_mb": {k: round(peak[k] - peak["folder"], 1) for k in kinds}}
    print(json.dumps(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
