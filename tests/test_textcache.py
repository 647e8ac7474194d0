"""The text embedding cache (stores/textcache): texts its weights encoded before are never encoded
again, in any index; another model's weights never read them; a broken cache is only slower."""

from __future__ import annotations

import numpy as np
import pytest

from coder_index import TextIndex
from coder_index.pipeline.build import build_index

from conftest import shared_path

DESCRIPTORS = "descriptors_pets.json"


@pytest.fixture
def counted(encoder, monkeypatch):
    """The texts the model really encodes."""
    seen: list[str] = []
    real = type(encoder).encode_texts

    def spy(self, texts, *a, **k):
        seen.extend(texts)
        return real(self, texts, *a, **k)

    monkeypatch.setattr(type(encoder), "encode_texts", spy)
    return seen


def build(path, encoder, classes_file, cache, **kw):
    return build_index(path, classes_file, encoder=encoder, dataset="oxford_pets", text_cache=cache,
                       descriptors=[shared_path("data", "descriptors", DESCRIPTORS)], **kw)


def matrix(path, encoder):
    """(texts, embeddings) of an index, ordered by text: indexes built apart compare row by row."""
    index = TextIndex.open(path, encoder=encoder)
    table = index.text_table()
    meta = index.texts_by_id(int(i) for i in table.ids)
    texts = [meta[int(i)]["text"] for i in table.ids]
    order = sorted(range(len(texts)), key=lambda k: (texts[k], int(table.class_ids[k])))
    return [texts[k] for k in order], table.embeddings[order]


def test_a_second_index_over_the_same_texts_encodes_none(tmp_path, encoder, classes_file, counted):
    cache = tmp_path / "texts.sqlite"
    first = build(tmp_path / "a", encoder, classes_file, cache)
    n = sum(first.added.values())
    assert first.text_encoding["encoded"] == n == len(counted) and first.text_encoding["from_cache"] == 0
    counted.clear()
    second = build(tmp_path / "b", encoder, classes_file, cache)
    assert counted == [] and second.text_encoding == {**second.text_encoding, "encoded": 0, "from_cache": n}
    rebuilt = build(tmp_path / "a", encoder, classes_file, cache, overwrite=True)
    assert counted == [] and rebuilt.text_encoding["from_cache"] == n

    uncached = build(tmp_path / "c", encoder, classes_file, False)
    assert len(counted) == n and uncached.text_encoding["from_cache"] == 0
    texts_a, emb_a = matrix(tmp_path / "a", encoder)
    texts_b, emb_b = matrix(tmp_path / "b", encoder)
    texts_c, emb_c = matrix(tmp_path / "c", encoder)
    assert texts_a == texts_b == texts_c
    np.testing.assert_array_equal(emb_a, emb_b)                # read back: the very same vectors
    np.testing.assert_allclose(emb_b, emb_c, atol=1e-5)        # a fresh encoding: float rounding apart


def test_only_new_texts_are_encoded(tmp_path, encoder, classes_file, counted):
    cache = tmp_path / "texts.sqlite"
    build_index(tmp_path / "a", classes_file, encoder=encoder, dataset="oxford_pets", text_cache=cache)
    names = len(counted)
    counted.clear()
    report = build(tmp_path / "b", encoder, classes_file, cache)   # the same names plus the descriptors
    assert report.text_encoding["from_cache"] == names
    assert report.text_encoding["encoded"] == len(counted) == report.added["attribute"]


def test_another_models_weights_never_read_them(tmp_path, encoder, other_tiny_model, classes_file):
    from coder_index import ClipEncoder

    cache = tmp_path / "texts.sqlite"
    build(tmp_path / "a", encoder, classes_file, cache)
    other = ClipEncoder(other_tiny_model, device="cpu")
    report = build(tmp_path / "b", other, classes_file, cache)
    assert report.text_encoding["from_cache"] == 0 and report.text_encoding["encoded"] > 0


@pytest.mark.parametrize("breakage", ["garbage", "unwritable", "a folder"])
def test_a_broken_cache_only_costs_encoding(tmp_path, encoder, classes_file, breakage):
    cache = tmp_path / "cache" / "texts.sqlite"
    cache.parent.mkdir()
    if breakage == "garbage":
        cache.write_bytes(b"not a database " * 100)
    elif breakage == "unwritable":
        blocker = tmp_path / "file"
        blocker.write_text("x")
        cache = blocker / "texts.sqlite"   # its folder is a file: cannot be created
    else:
        cache.mkdir()
    report = build(tmp_path / "a", encoder, classes_file, cache)
    assert report.text_encoding["encoded"] == sum(report.added.values()) > 0
    _, emb = matrix(tmp_path / "a", encoder)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_the_cli_says_what_came_from_the_cache(tmp_path, tiny_model, classes_file):
    from click.testing import CliRunner

    from coder_index_cli.main import cli

    args = ["build", None, "--classes", str(classes_file), "--model", tiny_model, "--text-cache",
            str(tmp_path / "t.sqlite")]
    first = CliRunner().invoke(cli, [a if a else str(tmp_path / "a") for a in args])
    second = CliRunner().invoke(cli, [a if a else str(tmp_path / "b") for a in args])
    assert first.exit_code == second.exit_code == 0, first.output + second.output
    assert "from the text cache" not in first.output and "encoded 0 text(s), read" in second.output
    off = CliRunner().invoke(cli, ["build", str(tmp_path / "c"), "--classes", str(classes_file), "--model",
                                   tiny_model, "--text-cache", "off"])
    assert off.exit_code == 0 and "from the text cache" not in off.output
