"""LLM answers in the shapes models really produce, turned into clean lists."""

import pytest

from coder_index.textgen.parse import is_refusal, parse_list, parse_pair


@pytest.mark.parametrize("answer, expected", [
    ("- long tail\n- big eyes\n- long tail", ["long tail", "big eyes"]),
    ("1. long tail\n2) big eyes.\n3: furry", ["long tail", "big eyes", "furry"]),
    ("Sure! Here are some features:\n* **long tail**\n* big eyes\n\nHope this helps!", ["long tail", "big eyes"]),
    ('```json\n["long tail", "big eyes"]\n```', ["long tail", "big eyes"]),
    ("• long tail\n\n\n• Long Tail\n•   big   eyes ", ["long tail", "big eyes"]),
    ("long tail\nbig eyes", ["long tail", "big eyes"]),
    ("}}}{{{ ###", []),
    ("", []),
    ("I'm sorry, but I can't help with that.", []),
])
def test_parse_list(answer, expected):
    assert parse_list(answer) == expected


def test_names_split_a_comma_line_and_drop_sentences():
    assert parse_list("dog, lynx and tiger", names=True) == ["dog", "lynx", "tiger"]
    assert parse_list("- lynx\n- a cat that lives in the forests of northern Europe and Asia", names=True) == ["lynx"]
    assert parse_list("none", names=True) == []


def test_refusal():
    assert is_refusal("As an AI language model, I cannot")
    assert not is_refusal("- a long tail")


@pytest.mark.parametrize("answer", [
    "cat:\n- pointed ears\n- slit pupils\ndog:\n- longer snout",
    "**Cat**\n1. pointed ears\n2. slit pupils\n\n**Dog**\n1. longer snout",
    "Cat: pointed ears\nDog: longer snout\nCat: slit pupils",
    "Features of a cat:\n- pointed ears\n- slit pupils\nFeatures of a dog:\n- longer snout",
])
def test_parse_pair_shapes(answer):
    a, b = parse_pair(answer, "cat", "dog")
    assert set(a) == {"pointed ears", "slit pupils"} and b == ["longer snout"]


def test_parse_pair_prefers_longest_name_and_rejects_unsplittable():
    assert parse_pair("wild cat:\n- striped\ncat:\n- domestic", "cat", "wild cat") == (["domestic"], ["striped"])
    assert parse_pair("Here are the differences:\n- size\n- colour", "cat", "dog") == ([], [])


def test_parse_pair_released_style_headings():
    """The released ATG prompt answers "For River:" / "For Lake:" with '_' bullets."""
    answer = "For River:\n_Flowing water\n_Narrow and elongated body of water\nFor Lake:\n_Still or calm water\n"
    assert parse_pair(answer, "river", "lake") == (["Flowing water", "Narrow and elongated body of water"],
                                                   ["Still or calm water"])
    assert parse_pair("For a cat:\n- whiskers\nFor the dog:\n- wet nose", "cat", "dog") == (["whiskers"], ["wet nose"])
    assert parse_list("_four-limbed primate\n_black, grey\n_ long tail") == ["four-limbed primate", "black, grey",
                                                                                 "long tail"]
