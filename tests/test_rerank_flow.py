"""`classify --rerank`: pair texts found in the index or generated once on demand, then the rerank."""

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from coder_index import TextIndex, rerank
from coder_index.core.decode import load_image
from coder_index.methods.pair_stage import top_pairs
from coder_index_cli.main import cli

from images import GOOD, make_messy_folder
from llm_server import FakeLLMServer
from scores import assert_same_ranking

CLASSES = ["Abyssinian", "Bengal", "beagle", "pug", "samoyed"]


@pytest.fixture
def setup(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    res = CliRunner().invoke(cli, ["build", str(tmp_path / "idx"), "--classes", str(classes), "--model", tiny_model,
                                   "--dataset", "oxford_pets"])
    assert res.exit_code == 0, res.output
    folder = make_messy_folder(tmp_path / "imgs")
    with FakeLLMServer() as server:
        yield tmp_path, folder, server


def classify(tmp_path, folder, server, out, *extra):
    args = ["classify", str(folder), "--index", str(tmp_path / "idx"), "--out", str(tmp_path / out), "--workers",
            "0", "--rerank", "--base-url", server.base_url, "--llm-model", "fake", "--cache",
            str(tmp_path / "llm.sqlite"), "-q", *extra]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    with open(tmp_path / out, newline="", encoding="utf-8") as f:
        return res, list(csv.DictReader(f))


def test_pairs_generated_once_and_reused(setup):
    tmp_path, folder, server = setup
    res, rows = classify(tmp_path, folder, server, "a.csv")
    assert len(rows) == len(GOOD) and {r["method"] for r in rows} == {"coder*"}
    # 5 classes: every image's top-5 is all of them, 20 ordered pairs, one prompt per unordered pair
    assert server.by_kind["one_to_one"] == 10
    assert "20 class pair(s) met" in res.output and "20 generated now" in res.output
    index = TextIndex.open(tmp_path / "idx")
    assert index.counts()["pair_texts"] == 10 * 3  # default answer: 2 traits for a, 1 for b
    with index.engine.connect() as conn:
        texts = [r[0] for r in conn.exec_driver_sql("select text from pair_texts")]
    assert "Because of Abyssinian trait one, Abyssinian is different from Bengal" in texts

    # the labels are the rerank of the stage-1 logits with the stored pair texts
    emb = index.encoder.encode_images([load_image(folder / g) for g in sorted(GOOD)])
    logits = index.classifier().logits(emb)
    pairs = top_pairs(logits)
    expected = rerank(emb, logits, index.pair_embeddings(pairs))
    by_path = {r["path"].split("/imgs/")[1]: r["label"] for r in rows}
    assert [by_path[g] for g in sorted(GOOD)] == [CLASSES[i] for i in expected]

    res, rows2 = classify(tmp_path, folder, server, "b.csv")
    assert server.by_kind["one_to_one"] == 10  # second run: no LLM request
    assert [r["label"] for r in rows2] == [r["label"] for r in rows]


def test_budget_is_respected(setup):
    tmp_path, folder, server = setup
    res, rows = classify(tmp_path, folder, server, "a.csv", "--max-requests", "3")
    assert server.requests == 3 and "stopped at the request budget" in res.output
    assert len(rows) == len(GOOD)  # every image still classified; missing pairs count as ties
    assert TextIndex.open(tmp_path / "idx").counts()["pair_texts"] == 3 * 3


def test_without_llm_falls_back_to_stage_one(setup):
    tmp_path, folder, server = setup
    res, rows = classify(tmp_path, folder, server, "a.csv", "--llm", "none")
    assert "rerank unavailable" in res.output and server.requests == 0
    assert {r["method"] for r in rows} == {"coder"}


def test_pair_texts_from_a_knowledge_file(setup):
    tmp_path, folder, server = setup
    k = {"format": "coder-index/knowledge", "version": 1, "classes": {},
         "pairs": {"pug": {"beagle": ["a flat face"]}, "beagle": {"pug": ["long ears"]}},
         "provenance": {"llm": {"model": "gpt-x"}}}
    (tmp_path / "k.json").write_text(json.dumps(k))
    res = CliRunner().invoke(cli, ["build", str(tmp_path / "idx"), "--classes", str(tmp_path / "classes.txt"),
                                   "--knowledge", str(tmp_path / "k.json"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["added"]["pair"] == 2
    index = TextIndex.open(tmp_path / "idx")
    emb = index.pair_embeddings([(3, 2), (2, 3), (0, 1)])
    assert set(emb) == {(3, 2), (2, 3)} and emb[(3, 2)].shape == (1, index.dim)
    np.testing.assert_allclose(
        emb[(3, 2)][0], index.encoder.encode_texts(["Because of a flat face, pug is different from beagle"])[0],
        atol=1e-5)
    res, rows = classify(tmp_path, folder, server, "a.csv", "--llm", "none")
    assert "pair texts already in the index" in res.output and server.requests == 0
    assert {r["method"] for r in rows} == {"coder*"}


def test_cvpr24_pair_prompts_follow_the_class_list_and_send_no_max_tokens(tmp_path, tiny_model, monkeypatch):
    """Under cvpr24 each one-to-one prompt names its classes in the class list's order (not
    alphabetically) and, as the released generator, sends no max_tokens; the default preset sends
    its documented 600, and --max-tokens sets it."""
    from llm_server import prompt_kind

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    listed = ["samoyed", "pug", "beagle", "Bengal", "Abyssinian"]  # reversed alphabetical order
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(listed) + "\n")
    folder = make_messy_folder(tmp_path / "imgs")
    for name, preset in (("cvpr24", "cvpr24"), ("default", "default"), ("cvpr24-50", "cvpr24")):
        res = CliRunner().invoke(cli, ["build", str(tmp_path / name), "--classes", str(classes), "--model",
                                       tiny_model, "--dataset", "oxford-pet", "--preset", preset])
        assert res.exit_code == 0, res.output
    with FakeLLMServer() as server:
        base = ["classify", str(folder), "--workers", "0", "--rerank", "--base-url", server.base_url,
                "--llm-model", "fake", "-q"]
        res = CliRunner().invoke(cli, [*base, "--index", str(tmp_path / "cvpr24"), "--out", str(tmp_path / "a.csv"),
                                       "--cache", str(tmp_path / "a.sqlite")])
        assert res.exit_code == 0, res.output
        pairs = [prompt_kind(p)[1] for p in server.prompts]
        assert len(pairs) == 10 and all(listed.index(a) < listed.index(b) for a, b in pairs), pairs
        assert server.params and all("max_tokens" not in p for p in server.params)
        assert all(set(p) <= {"model", "temperature"} for p in server.params)  # the model (and the temperature)
        server.params.clear()
        res = CliRunner().invoke(cli, [*base, "--index", str(tmp_path / "default"), "--out", str(tmp_path / "b.csv"),
                                       "--cache", str(tmp_path / "b.sqlite")])
        assert res.exit_code == 0, res.output
        assert server.params and all(p["max_tokens"] == 600 for p in server.params)
        server.params.clear()
        res = CliRunner().invoke(cli, [*base, "--index", str(tmp_path / "cvpr24-50"), "--out", str(tmp_path / "c.csv"),
                                       "--cache", str(tmp_path / "c.sqlite"), "--max-tokens", "50"])
        assert res.exit_code == 0, res.output
        assert server.params and all(p["max_tokens"] == 50 for p in server.params)


def test_rerank_with_candidates_scores_rows_as_without(setup):
    """--candidates M with M = every class is stage 1 exactly; the CODER* rows (order, scores, the
    stage-1 columns) then equal the dense run's: the rerank decides them the same way in both."""
    tmp_path, folder, server = setup
    _, dense = classify(tmp_path, folder, server, "dense.csv", "--top-k", "5")
    _, cand = classify(tmp_path, folder, server, "cand.csv", "--top-k", "5", "--candidates", str(len(CLASSES)))
    assert len(dense) == len(cand) == len(GOOD)
    for d, c in zip(dense, cand, strict=True):  # the candidate path's products have other shapes: SCORE_ATOL
        assert d["path"] == c["path"]
        for label, score in (("label", "score"), ("stage1_label", "stage1_score")):
            assert_same_ranking([d[label]], [float(d[score])], [c[label]], [float(c[score])], what=d["path"])
    # the decided rows really moved off stage 1's probabilities (else the check above says little)
    assert any(abs(float(r["score"]) - float(r["stage1_score"])) > 1e-3 for r in dense)
