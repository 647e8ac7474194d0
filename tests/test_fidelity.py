"""The cvpr24 preset builds exactly the released code's texts; the released expert knowledge loads
without running code; the released computation (duplicates, several pair templates, gates) holds."""

import json
import pickle

import numpy as np
import pytest
from click.testing import CliRunner

from coder_index import TextIndex, heuristic_logits, rerank
from coder_index.core.errors import IndexFormatError, InputFormatError
from coder_index.core.presets import TextRecipe, gap_threshold_preset, resolve_dataset
from coder_index.pipeline.build import build_index
from coder_index.textgen.expert import load_expert_knowledge, load_plain_pickle
from coder_index_cli.main import cli

from released_texts import ANALOGOUS, ATTRIBUTE, CLASS, FEATURE, OTHER, RELEASED, SYNONYM


@pytest.mark.parametrize("key", sorted(RELEASED))
@pytest.mark.parametrize("task", ["zero-shot", "few-shot"])
def test_cvpr24_texts_equal_the_released_templates(key, task):
    recipe = TextRecipe.make("cvpr24", key, task)
    want = RELEASED[key]
    assert [it.text for it in recipe.name_texts([CLASS])] == want["name"]
    assert [it.text for it in recipe.attribute_texts(CLASS, [ATTRIBUTE], "s")] == want[f"attribute/{task}"]
    assert [it.text for it in recipe.analogous_texts(CLASS, [ANALOGOUS], "s")] == want[f"analogous/{task}"]
    assert [it.text for it in recipe.synonym_texts(CLASS, [SYNONYM], "s")] == want["synonym"]
    assert [t for _, t, _ in recipe.pair_texts(CLASS, OTHER, [FEATURE])] == want["pair"]


def test_released_quirks_are_reproduced():
    r = TextRecipe.make("cvpr24", "oxford-pet")
    # every synonym becomes the same constant text, counted once per synonym
    syn = r.synonym_texts("pug", ["carlin", "mops", "pug dog"], "s")
    assert [(it.text, it.weight) for it in syn] == [("a photo of a None, a type of pet.", 3)]
    # DTD: two templates run together because of a missing comma, so 3 templates, not 4
    assert len(TextRecipe.make("cvpr24", "DTD").pair_templates) == 3
    assert len(TextRecipe.make("cvpr24", "CUB200").pair_templates) == 11
    assert len(TextRecipe.make("cvpr24", "oxford-pet").pair_templates) == 4
    assert len(TextRecipe.make("cvpr24", "ImageNet").pair_templates) == 7
    # a repeated attribute counts twice in the class's mean
    att = r.attribute_texts("pug", ["curly tail", "curly tail", "flat face"], "s")
    assert sorted((it.text, it.weight) for it in att) == [("A pet photo of pug which has curly tail.", 2),
                                                          ("A pet photo of pug which has flat face.", 1)]
    # the default preset does not copy the quirk
    d = TextRecipe.make("default", "oxford_pets")
    assert [it.text for it in d.synonym_texts("pug", ["carlin"], "s")] == ["a photo of a carlin, a type of pet."]


def test_dataset_keys_released_and_own():
    for released, ours in [("ImageNet", "imagenet"), ("oxford-pet", "oxford_pets"), ("DTD", "dtd"), ("CUB200", "cub"),
                           ("food-101", "food101"), ("eurosat", "eurosat"), ("caltech-101", "caltech101"),
                           ("places-365", "places365"), ("oxford_flowers", "oxford_flowers"),
                           ("Aircraft", "fgvc_aircraft"), ("ucf101", "ucf101"), ("stanford_cars", "stanford_cars"),
                           ("sun397", "sun397")]:
        assert resolve_dataset(released) == ours
        assert TextRecipe.make("cvpr24", ours).released == released
    assert TextRecipe.make("cvpr24", "ImageNet-V2").released == "ImageNet-V2"
    with pytest.raises(InputFormatError, match="released datasets"):
        TextRecipe.make("cvpr24", "cifar10")
    with pytest.raises(InputFormatError, match="released datasets"):
        TextRecipe.make("cvpr24", None)


def test_gap_threshold_presets():
    expected = {"ImageNet": 0.1, "ImageNet-V2": 0.05, "places-365": 0.1, "caltech-101": 0.3, "DTD": 0.6,
                "CUB200": 0.2, "eurosat": 0.3, "food-101": 0.1, "oxford-pet": 0.1}
    assert {k: gap_threshold_preset(k) for k in expected} == expected
    assert gap_threshold_preset("imagenet") == 0.1
    with pytest.raises(InputFormatError, match="no rerank gate"):
        gap_threshold_preset("sun397")


# ------------------------------------------------------------------------------ expert knowledge
CLASSES = ["Abyssinian", "Bengal", "beagle", "pug"]


def write_expert(root, key="oxford-pet", classes=CLASSES):
    (root / "attribute").mkdir(parents=True)
    (root / "simile_class").mkdir()
    (root / "synonym").mkdir()
    (root / "ovo_attribute").mkdir()
    att = [[f"{c} trait {i}" for i in range(3)] + ([f"{c} trait 0"] if c == "pug" else []) for c in classes]
    ana = [["lynx", "ocelot"], ["leopard cat"], [], ["bulldog", "bulldog"]]
    (root / "attribute" / f"{key}.pkl").write_bytes(pickle.dumps(att, protocol=4))
    (root / "simile_class" / f"{key}.pkl").write_bytes(pickle.dumps(ana, protocol=2))
    (root / "synonym" / f"{key}.json").write_text(json.dumps([{"syno": ["a", "b"]}, {"syno": []}, {"syno": ["c"]},
                                                              {"syno": ["carlin"]}]))
    (root / "ovo_attribute" / f"{key}.json").write_text(json.dumps(
        {"pug": {"beagle": ["flat face", "curly tail", "flat face"]}, "beagle": {"pug": ["long ears"]},
         "Pug": {"Bengal": ["not matched: the released lookup is exact"]}}))
    return att, ana


def test_expert_knowledge_import_and_build(tmp_path, encoder):
    att, ana = write_expert(tmp_path / "expert_knowledge")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    report = build_index(tmp_path / "idx", tmp_path / "classes.txt", encoder=encoder, dataset="oxford-pet",
                         preset="cvpr24", expert_knowledge=tmp_path / "expert_knowledge")
    index = TextIndex.open(tmp_path / "idx", encoder=encoder)
    with index.engine.connect() as conn:
        rows = conn.exec_driver_sql("select c.name, t.kind, t.text, t.weight from texts t join classes c "
                                    "on c.id = t.class_id").all()
        pairs = conn.exec_driver_sql("select class_a, class_b, text, weight from pair_texts").all()
    got = {(c, k, t): w for c, k, t, w in rows}
    assert got[("pug", "attribute", "A pet photo of pug which has pug trait 0.")] == 2
    assert got[("pug", "analogous", "A pet photo of a pug similar to bulldog.")] == 2
    assert got[("Abyssinian", "synonym", "a photo of a None, a type of pet.")] == 2
    assert not [k for k in got if k[0] == "Bengal" and k[1] == "synonym"]
    assert got[("Abyssinian", "name", "a photo of a Abyssinian, a type of pet.")] == 1
    assert report.added["pair"] == 2 * 4 + 1 * 4  # 2 distinct features x 4 templates; 1 x 4
    assert {w for *_, w in pairs} == {1, 2}       # "flat face" listed twice counts twice
    assert index.recipe.released == "oxford-pet"

    # the released computation on the same embeddings: every text as often as listed, concatenated
    table = index.text_table()
    x = encoder.encode_texts(["a pug on a sofa", "a cat", "a dog in a park"])
    per_class = []
    for ci in range(len(CLASSES)):
        own = table.class_ids == ci
        per_class.append((table.embeddings[own & np.isin(table.kinds, ["attribute", "analogous"])],
                          table.embeddings[own & np.isin(table.kinds, ["name", "synonym"])]))
    released = np.stack([[100 * np.mean(np.concatenate([e @ xi, [np.max(n @ xi)]])) for e, n in per_class]
                         for xi in x])
    assert sum(len(a) for a in att) + sum(len(a) for a in ana) == \
        int(np.isin(table.kinds, ["attribute", "analogous"]).sum())
    np.testing.assert_allclose(heuristic_logits(x @ table.embeddings.T, table.class_ids, table.kinds, 4), released,
                               rtol=1e-5)
    # the rerank averages over every template of every feature, repeats included
    pe = index.pair_embeddings([(3, 2), (2, 3)])
    assert len(pe[(3, 2)]) == 3 * 4 and len(pe[(2, 3)]) == 4
    logits = np.zeros((1, 4), np.float32)
    logits[0, 2], logits[0, 3] = 2.0, 1.0
    score = np.mean(pe[(3, 2)] @ x[0]) - np.mean(pe[(2, 3)] @ x[0])
    assert rerank(x[:1], logits, pe, top=2)[0] == (3 if score > 0 else 2)


def test_expert_knowledge_errors(tmp_path):
    root = tmp_path / "ek"
    write_expert(root)
    with pytest.raises(InputFormatError, match="4 entries but the class list has 3"):
        load_expert_knowledge(root, "oxford-pet", CLASSES[:3])
    with pytest.raises(InputFormatError, match="holds none of"):
        load_expert_knowledge(root, "DTD", CLASSES)
    (root / "attribute" / "oxford-pet.pkl").write_bytes(pickle.dumps([["x"], "not a list", ["y"], ["z"]]))
    with pytest.raises(InputFormatError, match=r"entry \[1\] must be a list"):
        load_expert_knowledge(root, "oxford-pet", CLASSES)
    (root / "synonym" / "oxford-pet.json").unlink()
    (root / "attribute" / "oxford-pet.pkl").write_bytes(pickle.dumps([["x"]] * 4))
    k, missing = load_expert_knowledge(root, "oxford-pet", CLASSES)
    assert missing == ["synonym/oxford-pet.json (no synonym texts)"] and k.get("pug", "attribute") == ["x"]


class _Payload:
    """Unpickling this would call os.mkdir(target): the side effect the refusal must prevent."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        import os

        return os.mkdir, (self.target,)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_pickle_with_code_is_refused_and_nothing_runs(tmp_path, protocol):
    target = tmp_path / "pwned"
    bad = tmp_path / "attribute.pkl"
    bad.write_bytes(pickle.dumps([["fine"], _Payload(str(target))], protocol=protocol))
    with pytest.raises(InputFormatError, match=r"refused: .*mkdir"):
        load_plain_pickle(bad)
    assert not target.exists()
    # any global is refused, even a harmless class
    from collections import OrderedDict

    bad.write_bytes(pickle.dumps([OrderedDict(a=1)], protocol=protocol))
    with pytest.raises(InputFormatError, match="collections.OrderedDict"):
        load_plain_pickle(bad)
    # plain data loads
    bad.write_bytes(pickle.dumps([["a", "b"], {"k": (1, 2.5, None, True)}], protocol=protocol))
    assert load_plain_pickle(bad) == [["a", "b"], {"k": (1, 2.5, None, True)}]


def test_pickle_stays_refused_elsewhere(tmp_path):
    from coder_index.textgen.knowledge import load_knowledge

    p = tmp_path / "k.json"
    p.write_bytes(pickle.dumps({"pug": ["x"]}))
    with pytest.raises(InputFormatError, match="pickle"):
        load_knowledge(p)


def test_build_refuses_mixing_recipes(tmp_path, encoder):
    (tmp_path / "classes.txt").write_text("pug\nbeagle\n")
    build_index(tmp_path / "idx", tmp_path / "classes.txt", encoder=encoder, dataset="oxford_pets")
    with pytest.raises(IndexFormatError, match="do not mix"):
        build_index(tmp_path / "idx", tmp_path / "classes.txt", encoder=encoder, dataset="oxford-pet", preset="cvpr24")
    # without recipe options the index's own recipe is used
    report = build_index(tmp_path / "idx", tmp_path / "classes.txt", encoder=encoder)
    assert report.added["name"] == 0 and "oxford_pets" in report.recipe


def test_cli_cvpr24_build_and_preset_gate(tmp_path, tiny_model):
    root = tmp_path / "ek"
    write_expert(root)
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    r = CliRunner().invoke(cli, ["build", str(tmp_path / "idx"), "--classes", str(tmp_path / "classes.txt"),
                                 "--model", tiny_model, "--dataset", "oxford-pet", "--preset", "cvpr24",
                                 "--expert-knowledge", str(root)])
    assert r.exit_code == 0, r.output
    assert "preset cvpr24 (oxford-pet, zero-shot)" in r.output
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (60 * i, 20, 200 - 60 * i)).save(tmp_path / "imgs" / f"{i}.png")
    r = CliRunner().invoke(cli, ["classify", str(tmp_path / "imgs"), "--index", str(tmp_path / "idx"), "--out",
                                 str(tmp_path / "p.csv"), "--rerank", "--llm", "none", "--gap-threshold", "preset",
                                 "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["classify", str(tmp_path / "imgs"), "--index", str(tmp_path / "idx"), "--out",
                                 str(tmp_path / "p2.csv"), "--rerank", "--llm", "none", "--gap-threshold", "1.5"])
    assert r.exit_code != 0 and "not in [0, 1]" in r.output


def _shared_classes(name):
    from conftest import shared_path

    return [ln.strip() for ln in shared_path("data", "classnames", name).read_text().splitlines() if ln.strip()]


def test_few_shot_zero_shot_term_names_classes_as_the_released_loader():
    from coder_index.core.presets import loader_class_names

    imagenet = _shared_classes("ImageNet.txt")
    loader = loader_class_names("ImageNet", imagenet)
    changed = {i: (imagenet[i], loader[i]) for i in range(len(imagenet)) if imagenet[i] != loader[i]}
    # datasets/few_shot_dataset/imagenet.py's imagenet_classes against datasets/class_name/ImageNet.txt
    assert changed == {27: ("eft", "newt"), 638: ("maillot", "tights"), 744: ("projectile", "missile"),
                       836: ("sunglass", "sunglasses")}
    # a renamed vocabulary is left alone: only the released name at that label is replaced
    assert loader_class_names("ImageNet", ["a", "b"]) == ["a", "b"]
    assert loader_class_names("eurosat", _shared_classes("eurosat.txt")) == _shared_classes("eurosat1.txt")
    assert loader_class_names("DTD", ["banded", "blotchy"]) == ["banded", "blotchy"]
    with pytest.raises(InputFormatError, match="10 classes, the index 2"):
        loader_class_names("eurosat", ["a", "b"])


def test_cvpr24_few_shot_eurosat_texts_use_eurosat1_names(tmp_path, encoder):
    eurosat, eurosat1 = _shared_classes("eurosat.txt"), _shared_classes("eurosat1.txt")
    few = TextRecipe.make("cvpr24", "eurosat", "few-shot").for_classes(eurosat)
    # CODER.update_class_names: the few-shot EuroSAT texts say eurosat1's names, by label
    assert [it.text for it in few.name_texts(eurosat[:2])] == [
        f"a photo of {n}, satellite domain." for n in eurosat1[:2]]
    item = few.attribute_texts(eurosat[0], ["rows"], "s")[0]
    assert item.text == f"A satellite photo of {eurosat1[0]} which has rows."
    assert item.class_name == eurosat[0]  # the label stays the index's class
    assert TextRecipe.from_dict(few.to_dict()) == few
    zero = TextRecipe.make("cvpr24", "eurosat", "zero-shot").for_classes(eurosat)
    assert zero.name_texts(eurosat[:1])[0].text == f"a photo of {eurosat[0]}, satellite domain."
    assert "text_names" not in zero.to_dict()
    classes = tmp_path / "eurosat.txt"
    classes.write_text("\n".join(eurosat) + "\n")
    build_index(tmp_path / "idx", classes, encoder=encoder, preset="cvpr24", dataset="eurosat", task="few-shot")
    idx = TextIndex.open(tmp_path / "idx", encoder=encoder)
    assert idx.class_names() == eurosat
    table = idx.text_table(("name",))
    texts = idx.texts_by_id(table.ids.tolist())
    assert sorted(texts[i]["text"] for i in table.ids.tolist()) == sorted(
        f"a photo of {n}, satellite domain." for n in eurosat1)
