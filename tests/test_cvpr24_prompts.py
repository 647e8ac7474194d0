"""Under the cvpr24 preset the Auto Text Generator asks what the released ATG asked and reads the
answers as it did. The expected prompts and items in data/cvpr24_atg.json were recorded by running
the released ATG/ATG.py itself (data/make_cvpr24_atg.py), not by this code."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from coder_index.textgen import released
from coder_index.textgen.generator import AnalogousFilter, AutoTextGenerator
from coder_index.textgen.llm import LLMCache, LLMClient, LLMConfig
from coder_index_cli.main import cli

from llm_server import FakeLLMServer

DATA = json.loads((Path(__file__).parent / "data" / "cvpr24_atg.json").read_text(encoding="utf-8"))
CASES = DATA["cases"]
PROMPT = {"att": released.attribute_prompt, "syno": released.synonym_prompt, "ana": released.analogous_prompt}


def case_id(case):
    return f"{case['kind']}-{'-'.join(case['classes'])}-{case['answers'][0][:12]}"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789abcdef0123")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_first_prompt_is_the_released_message(case):
    if case["kind"] == "ovo":
        sent = released.one_to_one_prompt(*case["classes"])
    else:
        sent = PROMPT[case["kind"]](case["classes"][0])
    assert sent == case["sent"][0]  # one user message, no system message, the released text exactly


@pytest.mark.parametrize("case", [c for c in CASES if c["kind"] != "ana"], ids=case_id)
def test_answers_are_read_as_released(case):
    if case["kind"] == "ovo":
        assert [list(side) for side in released.read_pair(case["answers"][0])] == case["items"]
    else:
        assert released.read_list(case["answers"][0]) == case["items"]


def test_the_one_to_one_format_gives_features_to_both_classes():
    # the released format: the first class's list continues the prompt's "For {a}:\n_"
    first, second = released.read_pair("Long golden fur\n_Floppy ears\nFor tabby cat:\n_Striped coat\n_Pointed ears")
    assert first == ["Long golden fur", "Floppy ears"] and second == ["Striped coat", "Pointed ears"]


def test_follow_up_joins_the_refused_names_and_cuts_the_last_character():
    text = released.analogous_followup_prompt("tabby_cat", ["Tiger", "Big Cat"])[0]["content"]
    assert "Q: Tiger,Big Ca has already appeared in the class set. Please give 2 more other classes which are " \
           "visually similar to tabby cat." in text


def _generator(encoder, server, tmp_path, monkeypatch):
    too_close = DATA["too_close"]

    def judge(self, cls, names):  # the stand-in CLIP filter the recording used
        return np.array([n.strip() in too_close and too_close[n.strip()].replace("_", " ") != cls
                         for n in names], dtype=bool)

    monkeypatch.setattr(AnalogousFilter, "too_close", judge)
    llm = LLMClient(LLMConfig(model="fake-model", base_url=server.base_url, backoff_base=0.01, timeout=5.0),
                    LLMCache(tmp_path / "cache.sqlite"))
    return AutoTextGenerator(encoder, llm, synonym_source="llm", prompts="cvpr24")


@pytest.mark.parametrize("case", [c for c in CASES if c["kind"] in ("att", "syno", "ana")], ids=case_id)
def test_generator_sends_and_keeps_what_the_released_code_did(case, encoder, tmp_path, monkeypatch):
    kind = {"att": "attribute", "syno": "synonym", "ana": "analogous"}[case["kind"]]
    cls = case["classes"][0]
    spoken = cls.replace("_", " ")
    with FakeLLMServer() as server:
        server.queues[(kind, spoken)] = [case["answers"][0]]
        server.queues[("analogous_more", spoken)] = list(case["answers"][1:])
        gen = _generator(encoder, server, tmp_path, monkeypatch)
        knowledge, stats = gen.generate(DATA["classes"], [kind])
        mine = [m for m in server.messages if spoken in m[0]["content"].rsplit("Q:", 1)[-1]]
    assert mine == case["sent"]  # every prompt, follow-ups included, in order
    assert knowledge.get(cls, kind) == case["items"]
    assert knowledge.provenance["prompts"] == "cvpr24"
    if case["kind"] == "ana" and len(case["sent"]) > 1:
        assert stats.analogous_followups == len(case["sent"]) - 1


# coder-index asks one prompt per unordered pair, under cvpr24 naming its classes in the order first
# given (the rerank gives them in the class list's order; the released repository has no driver)
@pytest.mark.parametrize("case", [c for c in CASES if c["kind"] == "ovo"], ids=case_id)
def test_one_to_one_generation_reads_both_sides(case, encoder, tmp_path, monkeypatch):
    a, b = case["classes"]
    with FakeLLMServer() as server:
        server.queues[("one_to_one", a.replace("_", " "))] = [case["answers"][0]]
        gen = _generator(encoder, server, tmp_path, monkeypatch)
        features, stopped = gen.one_to_one([(a, b), (b, a)])
        sent = list(server.messages)
    assert sent == case["sent"] and not stopped  # one request serves both directions
    assert [features[(a, b)], features[(b, a)]] == case["items"]


def test_answers_keep_the_spaces_at_their_ends(encoder, tmp_path, monkeypatch):
    """The released reader never strips an answer whole: a refused name keeps its leading space in
    the follow-up prompt, and duplicates that differ by a space at the answer's start both stay."""
    with FakeLLMServer() as server:
        server.queues[("analogous", "tabby cat")] = [" Tiger\n_Lynx"]
        server.queues[("analogous_more", "tabby cat")] = ["Serval"] * 6
        server.queues[("attribute", "tabby cat")] = [" long tail\n_long tail"]
        gen = _generator(encoder, server, tmp_path, monkeypatch)
        knowledge, _ = gen.generate(DATA["classes"], ["analogous", "attribute"])
        followups = [m[0]["content"] for m in server.messages if "has already appeared" in m[0]["content"]]
    assert followups and followups[0].endswith(
        "Q:  Tige has already appeared in the class set. Please give 1 more other classes which are visually "
        "similar to tabby cat. Give me the class name without other words.\nA:\n_")
    assert knowledge.get("tabby cat", "attribute") == ["long tail", "long tail"]
    assert knowledge.get("tabby cat", "analogous")[0] == "Lynx"


@pytest.mark.parametrize("answer, sides", [("For lion:\n_Mane", ([], ["Mane"])),
                                           ("Orange coat\n_Stripes\nFor lion:", (["Orange coat", "Stripes"], []))])
def test_a_pair_answer_with_one_empty_side_is_kept_not_asked_again(answer, sides, encoder, tmp_path, monkeypatch):
    """As released, whatever the one-to-one answer gave is kept; the default preset asks again."""
    with FakeLLMServer() as server:
        server.queues[("one_to_one", "tiger")] = [answer]
        gen = _generator(encoder, server, tmp_path, monkeypatch)
        features, _ = gen.one_to_one([("tiger", "lion"), ("lion", "tiger")])
        assert server.requests == 1
    assert (features[("tiger", "lion")], features[("lion", "tiger")]) == sides
    with FakeLLMServer() as server:
        server.queues[("one_to_one", "lion")] = ["Mane\nFor tiger:\n_"] * 2  # the default prompt's names: sorted
        llm = LLMClient(LLMConfig(model="fake-model", base_url=server.base_url, backoff_base=0.01),
                        LLMCache(tmp_path / "default.sqlite"))
        AutoTextGenerator(encoder, llm).one_to_one([("tiger", "lion")])
        assert server.requests == 2


def test_default_preset_keeps_its_own_prompts(encoder, tmp_path, monkeypatch):
    with FakeLLMServer() as server:
        llm = LLMClient(LLMConfig(model="fake-model", base_url=server.base_url, backoff_base=0.01),
                        LLMCache(tmp_path / "c.sqlite"))
        AutoTextGenerator(encoder, llm).generate(["cat"], ["attribute"])
        assert server.messages[0][0]["role"] == "system"
        assert server.messages[0][-1]["content"] != released.attribute_prompt("cat")[0]["content"]


def test_generate_cli_preset_cvpr24_sends_the_released_prompts(tmp_path, tiny_model):
    classes = tmp_path / "classes.txt"
    classes.write_text("golden_retriever\ntabby cat\n")
    out = tmp_path / "k.json"
    with FakeLLMServer() as server:
        res = CliRunner().invoke(cli, ["generate", "--classes", str(classes), "--out", str(out), "--kinds", "attribute",
                                       "--preset", "cvpr24", "--base-url", server.base_url, "--llm-model", "fake",
                                       "--cache", str(tmp_path / "c.sqlite"), "--model", tiny_model,
                                       "-q"])
        assert res.exit_code == 0, res.output
        sent = sorted(m[0]["content"] for m in server.messages)
    assert sent == sorted(released.attribute_prompt(c)[0]["content"] for c in ("golden_retriever", "tabby cat"))
    k = json.loads(out.read_text())
    assert k["classes"]["golden_retriever"]["attribute"] == ["golden retriever shape", "golden retriever colour",
                                                           "golden retriever texture"]
    assert k["provenance"]["prompts"] == "cvpr24"
