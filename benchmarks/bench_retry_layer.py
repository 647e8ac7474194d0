"""What one dead unit costs: the requests a server that answers 503 to everything sees while
coder-index reads one shard from it, by HTTP and as an S3 endpoint (s3fs through the test server).
One retry layer means the policy's attempts (``CODER_INDEX_REMOTE_RETRIES``, 6 by default), not the
product of ours and the object-store library's own (botocore, s3fs).

    python benchmarks/bench_retry_layer.py [--attempts 6]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' misbehaving HTTP server

READ = ("import sys\nfrom coder_index.core.remote import open_stream\ntry:\n    open_stream(sys.argv[1]).read(10)\n"
        "except Exception as exc:\n    print(str(exc)[:300])")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attempts", type=int, default=6)
    args = ap.parse_args()

    from http_server import Fault, FileServer

    class Dead(dict):
        def get(self, path, default=None):  # noqa: ANN001, ANN201 - every path answers 503
            return Fault(status=[503])

    report = {}
    with FileServer(Path(tempfile.mkdtemp())) as server:
        server.faults = Dead()
        env = {**os.environ, "PYTHONPATH": str(REPO), "CODER_INDEX_REMOTE_RETRIES": str(args.attempts),
               "CODER_INDEX_REMOTE_BACKOFF": "0.01", "CODER_INDEX_REMOTE_MAX_WAIT": "0.05",
               "AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKE0000", "AWS_SECRET_ACCESS_KEY": "fake",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
               "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull,
               "FSSPEC_S3_ENDPOINT_URL": server.base_url}
        for name, spec in (("http", server.base_url + "/dead.tar"), ("s3", "s3://bucket/dead.tar")):
            before = len(server.requests)
            said = subprocess.run([sys.executable, "-c", READ, spec], env=env, capture_output=True, text=True)
            report[name] = {"requests": len(server.requests) - before, "error": said.stdout.strip()}
    print(json.dumps({"attempts": args.attempts, **report}, indent=2))


if __name__ == "__main__":
    main()
