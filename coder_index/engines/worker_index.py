"""The index as a Ray worker sees it: the driver's own (shared filesystem) or a node-local copy.

``source`` is a directory path, or a URI that ``core.remote`` reads (fsspec: ``s3://``, ``gs://``,
``hdfs://``, ``file://``, ...: the one way coder-index reaches remote data, with the same credentials
and configuration as shards); a URI is copied once per node into a cache folder, aside and renamed
into place, so that two workers on one node never see a half copy. The index found must be the
one the driver opened: same ``index_id``, same generation, same model weights.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coder_index.core.errors import CoderIndexError

if TYPE_CHECKING:
    from coder_index.methods.text_index import TextIndex


def cache_root() -> Path:
    return Path(os.environ.get("CODER_INDEX_WORKER_CACHE", Path(tempfile.gettempdir()) / "coder-index-workers"))


def open_worker_index(source: str, expect: dict[str, Any], device: str | None) -> TextIndex:
    from coder_index.methods.text_index import TextIndex

    key = f"{expect['index_id']}-g{expect['generation']}-p{expect['pairs_generation']}"
    path = _local_copy(source, key) if "://" in source else Path(source)
    if not path.is_dir():
        raise CoderIndexError(f"a Ray worker on {os.uname().nodename} cannot find the index at {source}: put it on "
                              "a filesystem every node mounts at the same path, or pass a URI to copy it from")
    index = TextIndex.open(path, device=device)
    found = {"index_id": index.index_id, "generation": index.generation, "pairs_generation": index.pairs_generation}
    if found != {k: expect[k] for k in found}:
        raise CoderIndexError(f"the index a Ray worker opened at {source} ({found}) is not the one the driver "
                              f"opened ({ {k: expect[k] for k in found} }): it was changed or is another copy; "
                              "rerun once it is in place everywhere")
    if index.encoder.fingerprint.weights_sha256 != expect["weights_sha256"]:
        raise CoderIndexError(f"a Ray worker on {os.uname().nodename} loaded other weights for "
                              f"{index.fingerprint.describe()}: make the same model files available on every node")
    return index


def _local_copy(uri: str, key: str) -> Path:
    import shutil

    from coder_index.core.remote import copy_folder

    dest = cache_root() / key
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=dest.parent))
    try:
        copy_folder(uri, str(tmp))
        try:
            os.rename(tmp, dest)  # first copy wins; an existing dest means another worker won
        except OSError:
            if not dest.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
