"""`coder-index eval`: report numbers against a direct computation, mapping, CSV, embedding cache."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from coder_index import TextIndex, coder_features, heuristic_logits, rerank
from coder_index.core.decode import load_image
from coder_index.methods.pair_stage import top_pairs
from coder_index_cli.main import cli

from conftest import run_cli
from llm_server import FakeLLMServer

CLASSES = ["Abyssinian", "Bengal", "beagle", "pug", "samoyed"]
FOLDERS = {"Abyssinian": "abyssinian", "Bengal": "bengal-cats", "beagle": "Beagle", "pug": "pug", "samoyed": "samoyed"}


def make_labelled(root, seed=0, per_class=4):
    rng = np.random.default_rng(seed)
    from PIL import Image

    for i, folder in enumerate(FOLDERS.values()):
        (root / folder).mkdir(parents=True)
        for j in range(per_class):
            base = np.array([40 * i, 255 - 40 * i, 120], dtype=np.int16)
            arr = np.clip(base + rng.integers(-60, 60, (36, 36, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / folder / f"{j}.png")
    (root / "pug" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return root


@pytest.fixture
def env(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("CODER_INDEX_CACHE_DIR", str(tmp_path / "cache"))
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    k = {"format": "coder-index/knowledge", "version": 1, "pairs": {}, "provenance": {},
         "classes": {c: {"attribute": [f"{c} feature {i}" for i in range(3)], "analogous": [f"{c} cousin"],
                         "synonym": [f"{c} alias"]} for c in CLASSES}}
    (tmp_path / "k.json").write_text(json.dumps(k))
    res = CliRunner().invoke(cli, ["build", str(tmp_path / "idx"), "--classes", str(classes), "--model", tiny_model,
                                   "--knowledge", str(tmp_path / "k.json")])
    assert res.exit_code == 0, res.output
    mapping = tmp_path / "mapping.csv"
    mapping.write_text("folder,class\nbengal-cats,Bengal\n")
    with FakeLLMServer() as server:
        yield tmp_path, make_labelled(tmp_path / "data"), mapping, server


def run_eval(tmp_path, data, mapping, server, out="rep", *extra):
    args = ["eval", str(data), "--index", str(tmp_path / "idx"), "--out", str(tmp_path / out), "--workers", "0",
            "--base-url", server.base_url, "--llm-model", "fake", "--cache", str(tmp_path / "llm.sqlite"),
            "--tsne-samples", "15", "-q", *extra]
    if mapping:
        args += ["--mapping", str(mapping)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    return json.loads((tmp_path / out / "report.json").read_text())


def direct(tmp_path, data):
    index = TextIndex.open(tmp_path / "idx")
    paths, labels = [], []
    for c, folder in FOLDERS.items():
        for f in sorted((data / folder).glob("*.png")):
            paths.append(f)
            labels.append(CLASSES.index(c))
    x = index.encoder.encode_images([load_image(p) for p in paths])
    return index, x, np.array(labels)


def test_report_matches_direct_computation(env):
    tmp_path, data, mapping, server = env
    rep = run_eval(tmp_path, data, mapping, server)
    index, x, y = direct(tmp_path, data)
    assert rep["images"] == len(y) == 20 and rep["skipped"] == 1
    got = {m["name"]: m for m in rep["methods"]}
    assert set(got) == {"clip", "vcd", "coder", "P", "P+Att", "P+Att+Ana", "P+Att+Ana+Syn", "coder*",
                        "coder*-gated (gap<0.3)"}

    table = index.text_table()
    s = coder_features(x, table.embeddings)
    coder = heuristic_logits(s, table.class_ids, table.kinds, 5)
    assert got["coder"]["top1"] == pytest.approx((coder.argmax(1) == y).mean())
    top5 = np.argsort(-coder, 1)[:, :5]
    assert got["coder"]["top5"] == pytest.approx((top5 == y[:, None]).any(1).mean())
    names = table.kinds == "name"
    p_only = heuristic_logits(s[:, names], table.class_ids[names], table.kinds[names], 5)
    assert got["P"]["top1"] == pytest.approx((p_only.argmax(1) == y).mean())

    # clip: CLIP's published prompt ensemble (the index has no dataset: ImageNet's 80 templates, as CLIP_benchmark)
    from coder_index.core.presets import clip_prompts

    name, templates = clip_prompts(None)
    assert name == "clip:imagenet" and len(templates) == 80 and rep["prompts"].startswith("clip:imagenet")
    emb = index.encoder.encode_texts([t.replace("{c}", c) for c in CLASSES for t in templates]).reshape(5, 80, -1)
    w = emb.mean(1)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    assert got["clip"]["top1"] == pytest.approx(((x @ w.T).argmax(1) == y).mean())
    # vcd: mean cosine to the class's attribute texts
    att = table.kinds == "attribute"
    vcd = np.stack([s[:, att & (table.class_ids == c)].mean(1) for c in range(5)], 1)
    assert got["vcd"]["top1"] == pytest.approx((vcd.argmax(1) == y).mean())

    # coder*: the rerank with the pair texts the run generated and stored
    final = rerank(x, coder, index.pair_embeddings(top_pairs(coder)))
    assert got["coder*"]["top1"] == pytest.approx((final == y).mean())
    eff = rep["rerank"]["coder*"]
    changed = final != coder.argmax(1)
    assert eff["changed"] == changed.sum()
    assert eff["fixed"] == (changed & (final == y)).sum() and eff["broke"] == (changed & (coder.argmax(1) == y)).sum()
    per_class = rep["per_class"]["coder"]
    assert per_class["pug"] == pytest.approx(((coder.argmax(1) == y) & (y == 3)).sum() / 4, abs=1e-4)
    assert (tmp_path / "rep" / "tsne.png").stat().st_size > 10_000
    assert "| coder |" in (tmp_path / "rep" / "report.md").read_text()
    assert server.by_kind["one_to_one"] > 0


def test_embedding_cache_reused_and_invalidated(env, other_tiny_model, settle_clock):
    from test_identity import CHANGES

    tmp_path, data, mapping, server = env
    settle_clock.advance(0.4)  # the images written just now count as settled
    first = run_eval(tmp_path, data, mapping, server, "a", "--methods", "coder")
    assert first["embeddings_from_cache"] == 0 and first["encoded"] == 20
    second = run_eval(tmp_path, data, mapping, server, "b", "--methods", "clip,coder")
    assert second["embeddings_from_cache"] == 20 and second["encoded"] == 0
    assert second["methods"][1]["top1"] == first["methods"][0]["top1"]
    # a file rewritten in place with its size and mtime kept, replaced by a rename, touched: re-encoded,
    # and only it (each change settled first, so that only the file's identity can tell it)
    target = data / "pug" / "0.png"
    target.write_bytes(target.read_bytes() + b"\0" * 2048)  # room to rewrite it in place with other bytes
    settle_clock.advance(0.4)
    assert run_eval(tmp_path, data, mapping, server, "c0", "--methods", "coder")["encoded"] == 1
    for n, change in enumerate(CHANGES):
        change(target)
        settle_clock.advance(0.4)
        again = run_eval(tmp_path, data, mapping, server, f"c{n + 1}", "--methods", "coder")
        assert again["embeddings_from_cache"] == 19 and again["encoded"] == 1, change.__name__
    # another model never reads these embeddings
    res = CliRunner().invoke(cli, ["build", str(tmp_path / "idx2"), "--classes", str(tmp_path / "classes.txt"),
                                   "--model", other_tiny_model])
    assert res.exit_code == 0
    args = ["eval", str(data), "--index", str(tmp_path / "idx2"), "--out", str(tmp_path / "d"), "--methods", "coder",
            "--mapping", str(mapping), "--workers", "0", "--tsne-samples", "0", "-q"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert json.loads((tmp_path / "d" / "report.json").read_text())["embeddings_from_cache"] == 0


def test_csv_labels_and_unmatched_names(env):
    tmp_path, data, mapping, server = env
    csv_file = data / "labels.csv"
    rows = ["path,label"] + [f"{folder}/{i}.png,{c}" for c, folder in FOLDERS.items() for i in range(4)]
    csv_file.write_text("\n".join(rows) + "\n")
    rep = run_eval(tmp_path, csv_file, None, server, "csv", "--methods", "coder")
    with_folders = run_eval(tmp_path, data, mapping, server, "dir", "--methods", "coder")
    assert rep["images"] == 20 and rep["methods"][0]["top1"] == with_folders["methods"][0]["top1"]
    res = CliRunner().invoke(cli, ["eval", str(data), "--index", str(tmp_path / "idx"), "--out",
                                   str(tmp_path / "x"), "-q"])
    assert res.exit_code == 1 and "bengal-cats" in res.output and "--mapping" in res.output


def test_clip_row_prompts_and_clip_benchmark_json(env):
    tmp_path, data, mapping, server = env
    rep = run_eval(tmp_path, data, mapping, server, "cb", "--methods", "clip,coder", "--prompts", "names",
                   "--report-format", "clip_benchmark")
    index, x, y = direct(tmp_path, data)
    table = index.text_table(("name",))
    w = np.stack([table.embeddings[table.class_ids == c].mean(0) for c in range(5)])
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    pred = (x @ w.T).argmax(1)
    clip = next(m for m in rep["methods"] if m["name"] == "clip")
    assert clip["top1"] == pytest.approx((pred == y).mean())
    dump = json.loads((tmp_path / "cb" / "clip_benchmark.json").read_text())
    assert set(dump) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert dump["task"] == "zeroshot_classification" and dump["model"] == index.fingerprint.model
    recall = np.mean([(pred[y == c] == c).mean() for c in range(5)])
    assert dump["metrics"] == {"acc1": pytest.approx((pred == y).mean()), "acc5": pytest.approx(1.0),
                               "mean_per_class_recall": pytest.approx(recall, abs=1e-6)}
    coder = json.loads((tmp_path / "cb" / "clip_benchmark_coder.json").read_text())
    assert coder["method"] == "coder" and coder["metrics"]["acc1"] == rep["methods"][1]["top1"]


def test_clip_weights_equal_a_clip_benchmark_style_classifier(tmp_path, encoder):
    """CLIP_benchmark's zero-shot classifier: open_clip's encode_text over the full context for every
    '{c}' template of the dataset, normalise, mean, normalise; images normalised; argmax of 100 x^ W."""
    import torch
    import torch.nn.functional as F

    from coder_index.core.presets import TextRecipe, clip_prompts
    from coder_index.methods.zeroshot import zero_shot_weights

    from conftest import shared_path

    classes = sorted(p.name for p in shared_path("data", "cifar10-test").iterdir())
    index = TextIndex.create(tmp_path / "idx", encoder, recipe=TextRecipe.make(dataset="cifar10"))
    index.add_classes(classes)
    index.add_texts(index.recipe.name_texts(classes))
    zs = zero_shot_weights(index)
    _, templates = clip_prompts("cifar10")
    assert len(templates) == 18 and zs.prompts.startswith("clip:cifar10")
    model, tok = encoder.model, encoder.tokenizer
    with torch.no_grad():
        w = []
        for c in classes:
            e = F.normalize(model.encode_text(tok([t.format(c=c) for t in templates])), dim=-1).mean(dim=0)
            w.append(e / e.norm())
        w = torch.stack(w, dim=1).numpy()
    paths = [p for c in classes for p in sorted((shared_path("data", "cifar10-test") / c).iterdir())[:10]]
    x = encoder.encode_images([load_image(p) for p in paths])
    np.testing.assert_allclose(zs.weights, w.T, atol=2e-6)
    assert np.array_equal(zs.logits(x).argmax(1), (100.0 * x @ w).argmax(1))


def test_eval_reads_images_through_the_one_feed_and_its_decoders(tmp_path, encoder, classes_file, monkeypatch):
    """eval's images come through classify's feed: --decode gpu takes the tensor decoder (libjpeg-turbo
    on the CPU, nvJPEG on a GPU), and auto takes it on a CUDA device; the report agrees with the
    reference decoder's within the decoders' documented difference."""
    import torch

    from coder_index.pipeline import feed
    from coder_index.pipeline.build import build_index
    from coder_index.pipeline.feed import resolve_decode, tensor_decoder_works

    from conftest import shared_path

    # the one rule of --decode auto: the tensor decoder on a CUDA device that decodes JPEGs, never for cvpr24
    assert resolve_decode("auto", torch.device("cuda"), probe=False) == "gpu"
    assert resolve_decode("auto", torch.device("cuda")) == ("gpu" if tensor_decoder_works(torch.device("cuda"))
                                                            else "cpu")
    assert resolve_decode("auto", torch.device("cuda"), released=True, probe=False) == "cpu"
    assert resolve_decode("auto", torch.device("cpu")) == "cpu" and resolve_decode("gpu", "cpu") == "gpu"
    build_index(tmp_path / "idx", classes_file, encoder=encoder, dataset="oxford_pets")
    data = tmp_path / "data"
    cifar = shared_path("data", "cifar10-test")
    for cls in ("Abyssinian", "pug"):
        (data / cls).mkdir(parents=True)
        for f in sorted((cifar / "cat").iterdir())[:4]:
            (data / cls / f.name).write_bytes(f.read_bytes())
    used = []
    real = feed.TensorFeed._decode
    monkeypatch.setattr(feed.TensorFeed, "_decode",
                        lambda self, jpegs: (used.append(len(jpegs)), real(self, jpegs))[1])
    reports = {}
    for mode in ("cpu", "gpu"):
        out = tmp_path / f"rep-{mode}"
        res = CliRunner().invoke(cli, ["eval", str(data), "--index", str(tmp_path / "idx"), "--out", str(out),
                                       "--methods", "coder", "--llm", "none", "--workers", "0", "--tsne-samples", "0",
                                       "--decode", mode, "--embedding-cache", str(tmp_path / f"{mode}.sqlite"), "-q"])
        assert res.exit_code == 0, res.output
        reports[mode] = json.loads((out / "report.json").read_text())
        assert (sum(used) == 8) == (mode == "gpu")  # every JPEG went through the tensor decoder, and only then
    assert reports["gpu"]["images"] == reports["cpu"]["images"] == 8


def test_the_wrote_line_names_every_file_written(env):
    tmp_path, data, mapping, server = env
    args = ["eval", str(data), "--index", str(tmp_path / "idx"), "--out", str(tmp_path / "w"), "--workers", "0",
            "--llm", "none", "--tsne-samples", "15", "--methods", "clip,coder", "--report-format", "clip_benchmark",
            "--mapping", str(mapping), "-q"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("wrote "))
    for name in sorted(p.name for p in (tmp_path / "w").iterdir()):
        assert name in line, (name, line)


def test_eval_where_no_image_could_be_read_says_so_in_one_line(built_index, tmp_path):
    for cls in ("pug", "beagle"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        (tmp_path / "data" / cls / "0.jpg").write_bytes(b"not an image at all")
    res = run_cli("eval", tmp_path / "data", "--index", built_index.path, "--out", tmp_path / "rep", "--llm", "none",
                  "--methods", "coder", "--workers", "0", "-q", ok=False)
    assert res.exit_code == 1
    errors = [ln for ln in res.output.splitlines() if ln.startswith("Error")]
    assert len(errors) == 1 and "no image of" in errors[0] and "could be read" in errors[0], res.output
    assert "not an image" in errors[0] and "shape" not in res.output and "empty" not in res.output
