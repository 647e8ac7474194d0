"""TextIndex: round trip, dedupe, model refusal, reads agree with writes."""

import json

import faiss
import numpy as np
import pytest

from coder_index import ClipEncoder, IndexFormatError, ModelMismatchError, TextIndex, TextItem
from coder_index.core.sources import InputFormatError, read_class_list, read_descriptor_file

from conftest import PET_CLASSES


def test_round_trip_counts_and_manifest(built_index, encoder):
    info = built_index.info()
    assert info["counts"]["classes"] == len(PET_CLASSES)
    n_name = info["counts"]["texts"]["name"]
    assert n_name == len(PET_CLASSES)  # oxford_pets has one name template
    assert info["counts"]["texts"]["attribute"] > 20
    manifest = json.loads((built_index.path / "manifest.json").read_text())
    assert manifest["model"]["weights_sha256"] == encoder.fingerprint.weights_sha256
    assert manifest["counts"] == info["counts"]
    assert {p.name for p in built_index.path.iterdir()} >= {"manifest.json", "texts.faiss", "meta.sqlite"}


def test_faiss_ids_are_sqlite_ids_and_vectors_match_texts(built_index, encoder):
    table = built_index.text_table()
    index = faiss.read_index(str(built_index.path / "texts.faiss"))
    assert index.ntotal == len(table)
    rows = built_index.texts_by_id(table.ids[:10])
    texts = [rows[int(i)]["text"] for i in table.ids[:10]]
    np.testing.assert_allclose(table.embeddings[:10], encoder.encode_texts(texts), atol=1e-5)
    for i in table.ids[:10]:
        np.testing.assert_allclose(index.reconstruct(int(i)), table.embeddings[table.ids == i][0], atol=0)


def test_duplicates_stored_once(built_index):
    before = built_index.counts()
    item = TextItem("pug", "attribute", "pug which has a curly tail", source="test")
    assert built_index.add_texts([item, item]).added == 1
    res = built_index.add_texts([item, TextItem("pug", "attribute", "  pug which has   a curly tail ")])
    assert (res.added, res.duplicates) == (0, 2)
    after = built_index.counts()
    assert after["texts"]["attribute"] == before["texts"]["attribute"] + 1
    # the same text under another kind or class is a different text
    assert built_index.add_texts([TextItem("pug", "analogous", "pug which has a curly tail")]).added == 1
    assert built_index.add_texts([TextItem("beagle", "attribute", "pug which has a curly tail")]).added == 1


def test_reopen_sees_same_texts(built_index, encoder):
    a = built_index.text_table()
    b = TextIndex.open(built_index.path, encoder=encoder).text_table()
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)


def test_other_model_is_refused(built_index, other_tiny_model):
    other = ClipEncoder(other_tiny_model, device="cpu")
    with pytest.raises(ModelMismatchError, match="built with CLIP model") as err:
        TextIndex.open(built_index.path, encoder=other)
    assert built_index.fingerprint.model in str(err.value)
    with pytest.raises(ModelMismatchError):
        TextIndex.create(built_index.path, other, exist_ok=True)


def test_unknown_class_and_kind_are_errors(built_index):
    with pytest.raises(ValueError, match="not in the index"):
        built_index.add_texts([TextItem("dragon", "name", "a photo of a dragon.")])
    with pytest.raises(ValueError, match="unknown text kind"):
        built_index.add_texts([TextItem("pug", "colour", "brown")])


def test_not_an_index(tmp_path):
    with pytest.raises(IndexFormatError, match="no manifest.json"):
        TextIndex.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(IndexFormatError, match="not valid JSON"):
        TextIndex.open(tmp_path)


def test_create_refuses_non_empty_directory(tmp_path, encoder):
    (tmp_path / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(IndexFormatError, match="not empty"):
        TextIndex.create(tmp_path, encoder)


def test_classify_and_nearest_texts_agree_with_direct_computation(built_index, encoder):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((4, encoder.embed_dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    table = built_index.text_table()
    sims = emb @ table.embeddings.T
    hits = built_index.nearest_texts(emb, k=3)
    for n in range(4):
        best = np.argsort(-sims[n])[:3]
        assert [h["cosine"] for h in hits[n]] == pytest.approx(sims[n, best].tolist(), abs=1e-5)
        assert [h["cosine"] for h in hits[n]] == sorted([h["cosine"] for h in hits[n]], reverse=True)
    from coder_index import heuristic_logits

    preds = built_index.classify(emb)
    np.testing.assert_allclose(preds.logits, heuristic_logits(sims, table.class_ids, table.kinds, 5), atol=1e-4)
    ids, probs = preds.top_k(3)
    assert (np.diff(probs, axis=1) <= 0).all() and ids[:, 0].tolist() == preds.class_ids.tolist()


def test_class_list_errors(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("cat\n\n# comment\ndog\ncat\n")
    with pytest.raises(InputFormatError, match="appears twice"):
        read_class_list(p)
    p.write_text("\n\n")
    with pytest.raises(InputFormatError, match="no class names"):
        read_class_list(p)


def test_descriptor_file_errors(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"cat": "whiskers"}))
    with pytest.raises(InputFormatError, match=r'd.json: \$\["cat"\] must be a list of strings'):
        read_descriptor_file(p)
    p.write_text(json.dumps(["cat"]))
    with pytest.raises(InputFormatError, match=r"class: \[descriptor"):
        read_descriptor_file(p)
    pkl = tmp_path / "d.json"
    pkl.write_bytes(b"\x80\x04\x95" + b"\x00" * 20)
    with pytest.raises(InputFormatError, match="pickle"):
        read_descriptor_file(pkl)
