"""WordNet on the real Debian data: setup for NLTK, CLIP sense choice, the offline generator."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from coder_index import TextIndex
from coder_index.textgen.generator import AutoTextGenerator
from coder_index.textgen.wordnet import WordNetMissing, setup_wordnet
from coder_index_cli.main import cli

IMAGENET_FIRST = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray",
                  "stingray", "cock", "hen", "ostrich"]


def test_setup_makes_an_nltk_readable_wordnet(tmp_path, wordnet_reader):
    dest = setup_wordnet(target=tmp_path)
    assert (dest / "lexnames").read_text().count("\n") == 45
    from coder_index.textgen.wordnet import load_wordnet

    wn = load_wordnet(tmp_path, auto_setup=False)
    assert wn.get_version() == "3.0" and wn.synsets("dog", "n")


def test_missing_wordnet_says_both_ways(tmp_path):
    with pytest.raises(WordNetMissing) as err:
        setup_wordnet(source=tmp_path, target=tmp_path / "out")
    assert "apt-get install wordnet-base wordnet-sense-index" in str(err.value) and "--download" in str(err.value)


def test_forest_synonyms(wordnet_texts):
    entry = wordnet_texts.entries(["forest"])["forest"]
    assert {"woodland", "woods"} & set(entry.synonyms)
    assert "forest" not in entry.synonyms


def test_sense_choice_uses_clip(wordnet_texts, encoder):
    # Find words whose CLIP-nearest definition is not WordNet's first sense; the chooser must follow CLIP.
    words = ["crane", "bass", "mouse", "bat", "seal", "mole", "jaguar", "kite", "drum", "star", "bow", "chest"]
    differs = 0
    chosen = wordnet_texts.choose_senses(words)
    for w in words:
        synsets = wordnet_texts.synsets(w)
        q = encoder.encode_texts([f"a photo of a {w}."])[0]
        d = encoder.encode_texts([s.definition() for s in synsets])
        assert chosen[w] == synsets[int(np.argmax(d @ q))]
        differs += chosen[w] != synsets[0]
    assert differs >= 1  # so this test tells "first sense" apart from "CLIP's choice"


def test_untrained_weights_take_wordnets_sense_order_and_say_so(encoder, wordnet_reader, caplog):
    """With --pretrained random (the README's offline trial) CLIP cannot judge senses: 'dog' is not
    'a pawl', 'cat' not 'a spiteful woman gossip'; WordNet's first sense is taken, and said."""
    import copy

    from coder_index.textgen.wordnet import WordNetTexts

    untrained = copy.copy(encoder)
    untrained.pretrained = "random"
    texts = WordNetTexts(untrained, wordnet_reader)
    words = ["dog", "cat", "crane", "bass", "mouse", "seal", "kite"]
    with caplog.at_level("WARNING"):
        chosen = texts.choose_senses(words)
    assert all(chosen[w] == texts.synsets(w)[0] for w in words)
    assert chosen["dog"].name() == "dog.n.01" and chosen["cat"].name() == "cat.n.01"
    assert "untrained" in caplog.text and "first" in caplog.text
    gen = AutoTextGenerator(untrained, None, analogous_threshold=0.999, wordnet=texts)
    k, _ = gen.generate(["dog"], ["synonym"])
    assert k.provenance["wordnet_senses"] == "wordnet-order"
    assert WordNetTexts(encoder, wordnet_reader).sense_choice == "clip"  # trained (or unknown) weights: CLIP


def test_offline_generator_on_imagenet_classes(encoder, wordnet_texts):
    gen = AutoTextGenerator(encoder, None, analogous_threshold=0.999, wordnet=wordnet_texts)
    k, stats = gen.generate(IMAGENET_FIRST + ["not a real class xyz"])
    for c in IMAGENET_FIRST:
        assert k.get(c, "attribute_text"), c
        assert k.get(c, "analogous"), c
        assert set(k.classes[c]["source"].values()) == {"wordnet"}
    assert "tench: freshwater dace-like game fish" in k.get("tench", "attribute_text")[0]
    assert "tench, a type of cyprinid." in k.get("tench", "attribute_text")
    assert stats.not_in_wordnet == ["not a real class xyz"]
    assert stats.with_kind["attribute"] == len(IMAGENET_FIRST)


def test_cli_generate_offline_then_build(tmp_path, tiny_model, wordnet_reader):
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(IMAGENET_FIRST[:5] + ["zzz unknown"]) + "\n")
    runner = CliRunner()
    res = runner.invoke(cli, ["generate", "--classes", str(classes), "--out", str(tmp_path / "k.json"),
                              "--llm", "none", "--model", tiny_model, "--analogous-threshold", "0.999", "-q"])
    assert res.exit_code == 0, res.output
    assert "not in WordNet (1): zzz unknown" in res.output
    k = json.loads((tmp_path / "k.json").read_text())
    assert k["provenance"]["llm"] is None and k["classes"]["tench"]["source"]["analogous"] == "wordnet"
    res = runner.invoke(cli, ["build", str(tmp_path / "idx"), "--classes", str(classes), "--model", tiny_model,
                              "--knowledge", str(tmp_path / "k.json"), "--json"])
    assert res.exit_code == 0, res.output
    index = TextIndex.open(tmp_path / "idx")
    counts = index.counts()["texts"]
    assert counts["attribute"] > 0 and counts["analogous"] > 0 and counts["synonym"] > 0
    with index.engine.connect() as conn:
        sources = {r[0] for r in conn.exec_driver_sql("select distinct source from texts where kind != 'name'")}
    assert sources == {"wordnet"}
