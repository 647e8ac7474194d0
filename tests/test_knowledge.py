"""Knowledge files: round trip, the published formats, and what `build --knowledge` stores."""

import json
import pickle

import pytest

from coder_index import TextIndex
from coder_index.core.errors import InputFormatError
from coder_index.core.presets import TextRecipe
from coder_index.pipeline.build import build_index
from coder_index.textgen.knowledge import Knowledge, load_knowledge

from conftest import shared_path


def test_round_trip(tmp_path):
    k = Knowledge(provenance={"generator": "test"})
    k.set("cat", "attribute", ["whiskers"], "llm:m")
    k.set("cat", "synonym", ["true cat"], "wordnet")
    k.set_pair("cat", "dog", ["slit pupils"])
    k.save(tmp_path / "k.json")
    back = load_knowledge(tmp_path / "k.json")
    assert back.classes == k.classes and back.pairs == k.pairs and back.provenance == k.provenance
    assert back.pair("cat", "dog") == ["slit pupils"] and back.pair("dog", "cat") is None


def test_descriptor_and_cupl_formats_are_told_apart(tmp_path):
    desc = load_knowledge(shared_path("data", "descriptors", "descriptors_pets.json"))
    assert desc.get("Abyssinian", "attribute") and not desc.get("Abyssinian", "attribute_text")
    cupl = tmp_path / "cupl.json"
    cupl.write_text(json.dumps({"cat": ["A cat is a small furry pet.", "A photo of a cat on a sofa."],
                                "dog": ["A dog has a wet nose."]}))
    k = load_knowledge(cupl)
    assert k.get("cat", "attribute_text") == ["A cat is a small furry pet.", "A photo of a cat on a sofa."]
    assert k.classes["cat"]["source"]["attribute_text"] == "import:cupl.json"
    assert load_knowledge(cupl, fmt="descriptors").get("dog", "attribute") == ["A dog has a wet nose."]


def test_pickle_and_malformed_files_are_refused(tmp_path):
    p = tmp_path / "k.json"
    p.write_bytes(pickle.dumps({"cat": ["x"]}))
    with pytest.raises(InputFormatError, match="pickle"):
        load_knowledge(p)
    (tmp_path / "k.pkl").write_text("{}")
    with pytest.raises(InputFormatError, match="pickle"):
        load_knowledge(tmp_path / "k.pkl")
    p.write_text(json.dumps({"format": "coder-index/knowledge", "classes": {"cat": {"attribute": "x"}}}))
    with pytest.raises(InputFormatError, match="list of strings"):
        load_knowledge(p)


def test_text_items_apply_dataset_templates():
    k = Knowledge()
    k.set("pug", "attribute", ["a curly tail"], "llm:m")
    k.set("pug", "attribute_text", ["Pugs are small dogs."], "import:x")
    k.set("pug", "analogous", ["bulldog"], "llm:m")
    k.set("pug", "synonym", ["carlin"], "wordnet")
    items = {(i.kind, i.text, i.source) for i in k.text_items(["pug"], TextRecipe.make(dataset="oxford_pets"))}
    assert items == {("attribute", "pug, a type of pet, which has a curly tail", "llm:m"),
                     ("attribute", "Pugs are small dogs.", "import:x"),
                     ("analogous", "a pug similar to bulldog", "llm:m"),
                     ("synonym", "a photo of a carlin, a type of pet.", "wordnet")}


def test_build_with_knowledge_stores_every_kind_with_its_source(tmp_path, encoder, classes_file):
    k = Knowledge()
    k.set("pug", "attribute", ["a curly tail"], "llm:m")
    k.set("pug", "analogous", ["bulldog"], "llm:m")
    k.set("beagle", "synonym", ["harrier hound"], "wordnet")
    k.save(tmp_path / "k.json")
    report = build_index(tmp_path / "idx", classes_file, encoder=encoder,
                         knowledge=[load_knowledge(tmp_path / "k.json")])
    assert report.added["attribute"] == 1 and report.added["analogous"] == 1
    assert report.added["synonym"] == len(TextRecipe.make().name_templates)
    index = TextIndex.open(tmp_path / "idx", encoder=encoder)
    with index.engine.connect() as conn:
        rows = set(conn.exec_driver_sql("select kind, source from texts where kind != 'name'"))
    assert rows == {("attribute", "llm:m"), ("analogous", "llm:m"), ("synonym", "wordnet")}
