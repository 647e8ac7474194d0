"""Issue-3 figures: LLM concurrency speed-up against a loopback server, and WordNet coverage.

1. The 100 Caltech-101 classes, attribute + analogous prompts, against the loopback
   OpenAI-compatible server of the tests with 0.2 s injected latency: concurrency 1 vs 16
   (fresh caches), prompts sent and wall time.
2. The offline WordNet generator over the 1,000 ImageNet classes: share of classes with at least
   one attribute, analogous and synonym text. The CLIP filter needs real weights to mean anything;
   with the random test model it is reported with the filter off (threshold 1.0) and on (0.9).

    python benchmarks/bench_textgen.py --shared ../shared
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from llm_server import FakeLLMServer  # noqa: E402
from tiny_model import write_tiny_model  # noqa: E402


def bench_concurrency(encoder, classes: list[str], latency: float) -> list[dict]:
    from coder_index.textgen.generator import AutoTextGenerator
    from coder_index.textgen.llm import LLMCache, LLMClient, LLMConfig

    os.environ.setdefault("OPENAI_API_KEY", "sk-bench")
    rows = []
    for conc in (1, 16):
        with FakeLLMServer(latency=latency) as srv, tempfile.TemporaryDirectory() as tmp:
            llm = LLMClient(LLMConfig(model="bench", base_url=srv.base_url, concurrency=conc),
                            LLMCache(Path(tmp) / "c.sqlite"))
            gen = AutoTextGenerator(encoder, llm, analogous_threshold=0.999)
            t0 = time.perf_counter()
            k, stats = gen.generate(classes, ["attribute", "analogous"])
            wall = round(time.perf_counter() - t0, 2)
            rows.append({"concurrency": conc, "prompts_sent": srv.requests, "wall_s": wall,
                         "max_in_flight": srv.max_in_flight,
                         "classes_with_attribute": stats.with_kind["attribute"]})
            print(json.dumps(rows[-1]), flush=True)
    rows.append({"speedup": round(rows[0]["wall_s"] / rows[1]["wall_s"], 2)})
    return rows


def bench_coverage(encoder, classes: list[str]) -> list[dict]:
    from coder_index.textgen.generator import AutoTextGenerator
    from coder_index.textgen.wordnet import WordNetTexts

    wn = WordNetTexts(encoder)
    rows = []
    for thr in (1.0, 0.9):
        gen = AutoTextGenerator(encoder, None, analogous_threshold=thr, wordnet=wn)
        t0 = time.perf_counter()
        k, stats = gen.generate(classes)
        n = len(classes)
        rows.append({"analogous_threshold": thr, "classes": n, "seconds": round(time.perf_counter() - t0, 1),
                     "in_wordnet": n - len(stats.not_in_wordnet),
                     **{f"with_{kind}": round(stats.with_kind[kind] / n, 3) for kind in stats.with_kind}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--out", type=Path, default=Path("bench-out/bench_textgen.json"))
    args = ap.parse_args()

    from coder_index import ClipEncoder
    from coder_index.core.sources import read_class_list

    model = write_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    encoder = ClipEncoder(model, device="cpu")
    caltech = read_class_list(args.shared / "data" / "classnames" / "caltech-101.txt")
    imagenet = read_class_list(args.shared / "data" / "classnames" / "ImageNet.txt")
    results = {"concurrency": bench_concurrency(encoder, caltech, args.latency),
               "wordnet_coverage": bench_coverage(encoder, imagenet)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
