"""A real Ray cluster: a head and a worker node as separate raylets on 127.0.0.1 (ray.cluster_utils, as
``ray start --head`` and ``ray start --address`` would make them), each with its own cache folder and
no shared disk assumed: the shards are read by URL from a local HTTP server, the index copied by each
node from an S3-compatible server. The worker node is killed (SIGKILL, raylet and workers) while it
reads shards: every image ends up exactly once in the rows, its embedding beside it."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from http_server import Fault, FileServer
from s3_server import s3_fs, s3_server
from test_shards import photos, read_saved, write_shards

ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")
# one Ray at a time: under pytest-xdist the Ray modules share one worker (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("ray")


def rows(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return [r["path"] for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_model):
    from click.testing import CliRunner

    from coder_index_cli.main import cli

    root = tmp_path_factory.mktemp("cluster")
    (root / "classes.txt").write_text("cat\nship\ntruck\nairplane\n")
    res = CliRunner().invoke(cli, ["build", str(root / "idx"), "--classes", str(root / "classes.txt"), "--model",
                                   tiny_model, "-q"])
    assert res.exit_code == 0, res.output
    shards = write_shards(root / "shards", photos(24), per_shard=4)
    return {"root": root, "index": root / "idx", "shards": shards}


@pytest.fixture
def cluster(tmp_path, data):
    """The S3 server holding the index, and a cluster of two nodes that reach it from their environment."""
    from ray.cluster_utils import Cluster

    with s3_server() as s3:
        fs = s3_fs(s3)
        fs.mkdir("store")
        fs.put(str(data["index"]) + "/", "store/idx/", recursive=True)
        node_env = {**s3, "HF_HUB_OFFLINE": "1"}
        c = Cluster(initialize_head=True, connect=False,
                    head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False,
                                    "env_vars": {**node_env, "CODER_INDEX_WORKER_CACHE": str(tmp_path / "head")}})
        c.add_node(num_cpus=2, node_ip_address="127.0.0.1",
                   env_vars={**node_env, "CODER_INDEX_WORKER_CACHE": str(tmp_path / "worker")})
        try:
            yield c, s3
        finally:
            c.shutdown()


def classify_on(cluster_address: str, s3: dict[str, str], url: str, out: Path, index: Path, emb: Path
                ) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "CODER_INDEX_WORKER_CACHE"}  # each node has its own
    # the driver joins a cluster on loopback: Ray would otherwise swap 127.0.0.1 for the machine's address
    env.update({**s3, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1"})
    cmd = [sys.executable, "-m", "coder_index_cli.main", "classify", url, "--index", str(index), "--out", str(out),
           "--engine", "ray", "--ray-address", cluster_address, "--ray-index-source", "s3://store/idx",
           "--save-embeddings", str(emb), "--embeddings-part-rows", "5", "-q"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_worker_node_killed_mid_run_loses_and_doubles_nothing(cluster, data, tmp_path):
    c, s3 = cluster
    worker = next(n for n in c.worker_nodes)
    out, emb = tmp_path / "p.csv", tmp_path / "emb"
    with FileServer(data["root"] / "shards") as server:
        for s in data["shards"]:  # each first read stalls, then is cut: the shards are in hand when the node dies
            server.faults[s.name] = Fault(stall_after=2000, stall=5, times=1)
        url = server.base_url + "/{00000..00005}.tar"
        proc = classify_on(c.address, s3, url, out, data["index"], emb)
        deadline = time.time() + 180
        while len({p for p, _, _ in server.requests}) < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        c.remove_node(worker, allow_graceful=False)  # SIGKILL: its raylet and its workers
        _, err = proc.communicate(timeout=400)
        if proc.returncode != 0:  # stopped: then it must say so in one clear line, and a rerun completes
            assert "Traceback" not in err and "Error:" in err, err[-3000:]
            c.add_node(num_cpus=2, node_ip_address="127.0.0.1",
                       env_vars={**s3, "HF_HUB_OFFLINE": "1", "CODER_INDEX_WORKER_CACHE": str(tmp_path / "new")})
            again = classify_on(c.address, s3, url, out, data["index"], emb)
            _, err = again.communicate(timeout=400)
            assert again.returncode == 0, err[-3000:]
        # the shards the dead node held were read again (from their start or where they stopped)
        assert len(server.requests) > len(data["shards"])
    got = rows(out)
    assert len(got) == len(set(got)) == 24
    assert all(p.startswith(server.base_url + "/0000") for p in got)
    vectors, meta = read_saved(emb)
    assert sorted(m["image_path"] for m in meta) == sorted(got) and len(vectors) == 24
    # the index was copied onto each node from the object store, not read from a shared path
    assert (tmp_path / "head").is_dir() and any((tmp_path / "head").iterdir())
