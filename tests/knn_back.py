"""clip-retrieval's back-end for the tests, run by the Python of its own environment (``.knn-venv``:
clip-retrieval pins numpy<2 and pyarrow<16, which ours do not allow).

    python knn_back.py index EMB_DIR INDICE_DIR        autofaiss builds INDICE_DIR/image.index
    python knn_back.py serve INDICES_JSON MODEL_DIR    serves /knn-service on 127.0.0.1, prints the port

``serve`` builds the same Flask app as ``clip-retrieval back`` (its resources, its routes) with what must
be off here turned off (mclip, aesthetic embeddings, JIT: they reach the internet), the tests' local
random open_clip model registered under a name (the service splits ``open_clip:NAME/WEIGHTS`` at the
first slash), and the server bound to 127.0.0.1 (``clip_back`` binds 0.0.0.0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve()


# ------------------------------------------------------------------ the caller's side (our environment)
def knn_python() -> str:
    """The Python of clip-retrieval's environment: ``CODER_INDEX_KNN_PYTHON``, else ``.knn-venv``."""
    return os.environ.get("CODER_INDEX_KNN_PYTHON") or str(HERE.parents[1] / ".knn-venv" / "bin" / "python")


def make_indice(emb_dir: Path, indice_dir: Path, timeout: float = 600) -> None:
    """``index`` below, run by clip-retrieval's Python."""
    subprocess.run([knn_python(), str(HERE), "index", str(emb_dir), str(indice_dir)], check=True,
                   capture_output=True, timeout=timeout)


@contextmanager
def running_back(indices_json: Path, model_dir: str) -> Iterator[int]:
    """``serve`` below, run by clip-retrieval's Python, for the length of the block: yields its port."""
    proc = subprocess.Popen([knn_python(), str(HERE), "serve", str(indices_json), str(model_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = None
        for line in proc.stdout:
            if line.startswith("listening on port"):
                port = int(line.split()[-1])
                break
        if port is None:
            raise RuntimeError(f"clip-retrieval's back-end did not start (exit status {proc.wait(timeout=60)})")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=60)


# ------------------------------------------------------------------ clip-retrieval's side (.knn-venv)


def build_index(emb_dir: str, indice_dir: str) -> None:
    from autofaiss import build_index as autofaiss_build

    Path(indice_dir).mkdir(parents=True, exist_ok=True)
    autofaiss_build(embeddings=emb_dir, index_path=f"{indice_dir}/image.index",
                    index_infos_path=f"{indice_dir}/infos.json", metric_type="ip", index_key="Flat",
                    should_be_memory_mappable=True, max_index_memory_usage="1G", current_memory_available="2G",
                    verbose=40)


def serve(indices_json: str, model_dir: str) -> None:
    import open_clip
    from clip_retrieval.clip_back import ClipOptions, IndicesList, KnnService, MetadataService, load_clip_indices
    from flask import Flask
    from flask_cors import CORS
    from flask_restful import Api
    from werkzeug.serving import make_server

    cfg = json.loads((Path(model_dir) / "open_clip_config.json").read_text())["model_cfg"]
    configs = Path(tempfile.mkdtemp(prefix="knn-model-"))
    (configs / "coder-index-tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(configs)
    weights = Path(model_dir) / "open_clip_pytorch_model.bin"
    resources = load_clip_indices(indices_json, ClipOptions(
        indice_folder="", clip_model=f"open_clip:coder-index-tiny/{weights}", enable_hdf5=False,
        enable_faiss_memory_mapping=True, columns_to_return=["caption", "url"], reorder_metadata_by_ivf_index=False,
        enable_mclip_option=False, use_jit=False, use_arrow=False, provide_safety_model=False,
        provide_violence_detector=False, provide_aesthetic_embeddings=False))
    app = Flask("knn-back")
    api = Api(app)
    api.add_resource(IndicesList, "/indices-list", resource_class_kwargs={"indices": list(resources)})
    api.add_resource(MetadataService, "/metadata", resource_class_kwargs={"clip_resources": resources})
    api.add_resource(KnnService, "/knn-service", resource_class_kwargs={"clip_resources": resources})
    CORS(app)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    print(f"listening on port {server.server_port}", flush=True)  # (the model prints lines of its own first)
    server.serve_forever()


if __name__ == "__main__":
    {"index": build_index, "serve": serve}[sys.argv[1]](*sys.argv[2:])
