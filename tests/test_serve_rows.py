"""serve --predictions OUT shows every row's thumbnail and explanation, with no --images-root guess:
folder rows (the README's main job names them ../shared/...), listed files, and shard rows (in place,
compressed, by URL), found from what the run record says classify read. Only what classify read is
served: a row planted in the file that names anything else is refused."""

from __future__ import annotations

import gzip
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi", reason="serve needs its extra: pip install -e '.[serve]'")


from coder_index.serve import ServeConfig, create_app  # noqa: E402
from coder_index.serve.background import BackgroundServer  # noqa: E402

from conftest import run_cli
from http_server import FileServer  # noqa: E402
from test_shards import photos, write_shards  # noqa: E402

run = run_cli  # conftest's: the command line in this process, as a user types it


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("serve-rows")
    (root / "classes.txt").write_text("cat\nship\ntruck\n")
    run("build", root / "idx", "--classes", root / "classes.txt", "--model", tiny_model, "-q")
    samples = [p for p in photos(6) if not p[0].startswith("png")]
    work = root / "work"
    (work / "data" / "photos").mkdir(parents=True)
    for key, blob in samples:
        (work / "data" / "photos" / f"{key}.jpg").write_bytes(blob)
    shards = write_shards(work / "shards", samples, per_shard=3)
    (work / "gz").mkdir()
    for s in shards:
        (work / "gz" / (s.name + ".gz")).write_bytes(gzip.compress(s.read_bytes()))
    (work / "list.txt").write_text("".join(f"data/photos/{k}.jpg\n" for k, _ in samples[:3]))
    elsewhere = root / "elsewhere"  # classify run from a sibling folder: rows start with ../
    elsewhere.mkdir()
    return {"root": root, "work": work, "elsewhere": elsewhere, "index": root / "idx", "shards": shards}


def served(app_config: ServeConfig) -> tuple[list[int], list[int], str]:
    notes: list[str] = []
    app = create_app(app_config, note=notes.append)
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        rows = client.get("/api/predictions", params={"limit": 500}).json()["rows"]
        thumbs = [client.get("/api/predictions/image", params={"row": i, "size": 128}).status_code
                  for i in range(len(rows))]
        explained = [client.get("/api/predictions/explain", params={"row": i}).status_code for i in range(len(rows))]
    return thumbs, explained, " ".join(notes)


@pytest.mark.parametrize("what", ["folder", "folder-from-elsewhere", "files", "tar", "gz", "http"])
def test_every_row_shown_and_explained_without_images_root(setup, tmp_path, what):
    work, out = setup["work"], tmp_path / f"{what}.csv"
    with FileServer(work / "shards") as server:
        inputs = {"folder": (["data/photos"], work), "folder-from-elsewhere": (["../work/data/photos"],
                                                                               setup["elsewhere"]),
                  "files": (["--files-from", "list.txt"], work), "tar": (["shards"], work), "gz": (["gz"], work),
                  "http": ([server.base_url + "/{00000..00001}.tar"], work)}[what]
        run("classify", *inputs[0], "--index", setup["index"], "--out", out, "--workers", "0", "-q", cwd=inputs[1])
        thumbs, explained, notes = served(ServeConfig(index=setup["index"], predictions=out))
    assert thumbs and all(code == 200 for code in thumbs), thumbs
    assert all(code == 200 for code in explained), explained
    assert "warning" not in notes


def test_only_what_classify_read_is_served(setup, tmp_path):
    work = setup["work"]
    out = tmp_path / "p.csv"
    run("classify", "data/photos", "--index", setup["index"], "--out", out, "--workers", "0", "-q", cwd=work)
    secret = setup["root"] / "secret.jpg"
    secret.write_bytes(photos(3)[0][1])
    other_shard = setup["root"] / "other.tar"
    other_shard.write_bytes(setup["shards"][0].read_bytes())
    lines = out.read_text().splitlines()
    template = lines[1].split(",", 1)[1]
    for planted in (str(secret), "../secret.jpg", "data/../../secret.jpg", f"{other_shard}/cat_0000",
                    "shards/00000.tar/cat_0000", "http://127.0.0.1:9/x.jpg", "pipe:touch /tmp/x/KEY"):
        lines.append(f'"{planted}",{template}')
    out.write_text("\n".join(lines) + "\n")
    thumbs, _, _ = served(ServeConfig(index=setup["index"], predictions=out))
    n = len(lines) - 1 - 7
    assert all(code == 200 for code in thumbs[:n]) and all(code in (403, 404) for code in thumbs[n:]), thumbs
    assert not Path("/tmp/x/KEY").exists()


def test_unservable_rows_are_said_at_start_with_the_fix(setup, tmp_path):
    work = setup["work"]
    out = tmp_path / "p.csv"
    run("classify", "data/photos", "--index", setup["index"], "--out", out, "--workers", "0", "-q", cwd=work)
    out.with_name("p.csv.run.json").write_text('{"provenance": {"method": "coder"}}')  # as 0.3 wrote it
    _, _, notes = served(ServeConfig(index=setup["index"], predictions=out))
    assert "--images-root" in notes and "older classify" in notes
    thumbs, _, notes = served(ServeConfig(index=setup["index"], predictions=out, images_root=work))
    assert all(code == 200 for code in thumbs) and "warning" not in notes
