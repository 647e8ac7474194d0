"""Issue-11 figure: `coder-index --help` (and every command's --help) against `python -c "import torch"`,
side by side, medians of repeated runs. Goal: --help under 15% of the torch import.

    python benchmarks/bench_cli.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = [[], ["build"], ["classify"], ["explain"], ["info"], ["verify"], ["generate"], ["eval"], ["reproduce"],
            ["fewshot", "fit"], ["corpus", "build"], ["corpus", "search"], ["setup", "wordnet"]]


def timed(cmd: list[str], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path("bench-out/bench_cli.json"))
    args = ap.parse_args()
    exe = [sys.executable, "-m", "coder_index_cli.main"]
    torch_s = timed([sys.executable, "-c", "import torch"], args.repeat)
    rows = {" ".join(c) or "(root)": timed([*exe, *c, "--help"], args.repeat) for c in COMMANDS}
    worst = max(rows.values())
    result = {"import_torch_s": round(torch_s, 3), "help_s": {k: round(v, 3) for k, v in rows.items()},
              "worst_help_s": round(worst, 3), "worst_ratio_to_torch_import": round(worst / torch_s, 3)}
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
