"""Load test of `coder-index serve` on 127.0.0.1: N classify requests (one image each) sent at once
from this process to a server in another process, beside the same requests sent one at a time.
Reports p50/p99/max latency, requests/s, failures, and the mean number of images per forward pass
(the model thread batches concurrent requests).

    python benchmarks/bench_serve.py [--requests 200] [--model tiny|ViT-B-32]
    python benchmarks/bench_serve.py --memory    # decoded pixels in flight: the server's peak RSS

--memory sends 16 black 36-megapixel PNGs (about 100 KiB each) in 4 concurrent requests and asks
for a 256 px thumbnail of a listed 36-megapixel JPEG, and reports how much the server's peak
resident memory (VmHWM, Linux) grew for each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_index(tmp: Path, model: str) -> Path:
    classes = tmp / "classes.txt"
    classes.write_text((SHARED / "classnames" / "ImageNet.txt").read_text())
    args = [sys.executable, "-m", "coder_index_cli.main", "build", str(tmp / "idx"), "--classes", str(classes),
            "--dataset", "imagenet", "-q"]
    if model == "tiny":
        sys.path.insert(0, str(REPO / "tests"))
        from tiny_model import write_tiny_model

        args += ["--model", write_tiny_model(tmp / "tiny")]
    else:
        args += ["--model", model, "--pretrained", "random"]
    subprocess.run(args, check=True)
    return tmp / "idx"


async def burst(url: str, images: list[tuple[str, bytes]], concurrency: int) -> tuple[list[float], list[int], float]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as c:
        async def one(name: str, data: bytes) -> tuple[float, int]:
            async with sem:
                t = time.perf_counter()
                r = await c.post("/api/classify", files=[("files", (name, data, "image/jpeg"))])
                return time.perf_counter() - t, r.status_code

        t0 = time.perf_counter()
        out = await asyncio.gather(*[one(n, d) for n, d in images])
        return [o[0] for o in out], [o[1] for o in out], time.perf_counter() - t0


def report(name: str, lat: list[float], status: list[int], wall: float, passes: int) -> dict:
    ms = np.array(lat) * 1000
    row = {"run": name, "requests": len(lat), "failed": sum(s != 200 for s in status),
           "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
           "max_ms": round(float(ms.max()), 1), "req_per_s": round(len(lat) / wall, 1),
           "images_per_forward_pass": round(len(lat) / max(passes, 1), 1)}
    print(json.dumps(row))
    return row


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no VmHWM in /proc: --memory needs Linux")


def memory(index: Path, tmp: Path) -> None:
    import io
    import threading

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (6000, 6000)).save(buf, "PNG", compress_level=9)
    png = buf.getvalue()
    Image.new("RGB", (6000, 6000), (10, 200, 10)).save(tmp / "big.jpg", "JPEG", quality=80)
    (tmp / "p.csv").write_text('"path","label","score","method"\n"big.jpg","a",0.9,"coder"\n')
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "coder_index_cli.main", "serve", str(index), "--port", str(port),
                               "--predictions", str(tmp / "p.csv"), "--images-root", str(tmp)],
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url, server)
        small = (SHARED / "imagenet-samples" / "n01440764_tench.JPEG").read_bytes()
        httpx.post(url + "/api/classify", files=[("files", ("w.jpg", small, "image/jpeg"))], timeout=600)
        base = peak_rss_mb(server.pid)
        httpx.get(url + "/api/predictions/image", params={"path": "big.jpg", "size": 256}, timeout=600)
        after_thumb = peak_rss_mb(server.pid)

        def send() -> None:
            httpx.post(url + "/api/classify", files=[("files", (f"{i}.png", png, "image/png")) for i in range(4)],
                       timeout=600).raise_for_status()

        threads = [threading.Thread(target=send) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after_uploads = peak_rss_mb(server.pid)
        print(json.dumps({"png_kib": round(len(png) / 1024), "peak_rss_before_mb": round(base),
                          "grown_by_a_256px_thumbnail_of_36mp_jpeg_mb": round(after_thumb - base),
                          "grown_by_16_pngs_in_4_requests_mb": round(after_uploads - after_thumb)}))
    finally:
        server.terminate()
        server.wait(30)


def wait_for(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while True:
        try:
            httpx.get(url + "/api/info", timeout=5).raise_for_status()
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start") from None
            time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--model", default="tiny", help="tiny (the tests' model) or an open_clip name (random weights)")
    ap.add_argument("--memory", action="store_true", help="measure the peak RSS under large decoded images instead")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    index = build_index(tmp, args.model)
    if args.memory:
        memory(index, tmp)
        return
    samples = sorted((SHARED / "imagenet-samples").glob("*.JPEG"))
    images = [(samples[i % len(samples)].name, samples[i % len(samples)].read_bytes()) for i in range(args.requests)]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "coder_index_cli.main", "serve", str(index), "--port", str(port)],
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url, server)

        def passes() -> int:
            return httpx.get(url + "/api/info").json()["server"]["batches"]

        asyncio.run(burst(url, images[:8], 1))  # warm-up
        rows = []
        for name, conc in (("sequential", 1), (f"{args.requests} at once", args.requests)):
            before = passes()
            lat, status, wall = asyncio.run(burst(url, images, conc))
            rows.append(report(name, lat, status, wall, passes() - before))
        print(f"model {args.model}: {rows[1]['req_per_s'] / rows[0]['req_per_s']:.2f}x the requests/s of one at a time "
              f"({rows[1]['images_per_forward_pass']} images per forward pass); failures: "
              f"{rows[0]['failed'] + rows[1]['failed']}")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
