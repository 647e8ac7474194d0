"""The ``cvpr24`` preset's prompts and answer reading: what the released Auto Text Generator
(``ATG/ATG.py`` of YCaigogogo/CVPR24-CODER) sends and how it reads the answers, word for word.

The released generator sends one user message (no system message) per request, with the class
name's ``_`` replaced by a space. Every worked example ends its answer lines with ``_`` bullets and
the prompt ends with ``_``, so the answer continues the list. Reading an answer:

* attributes, LLM synonyms, analogous classes: newlines removed, split at ``_``, duplicates
  dropped, then each item stripped and empty items dropped. The released code drops duplicates
  with ``list(set(...))``, whose order changes from one Python process to the next; coder-index
  keeps the first occurrence of each item instead (the same items, in the answer's order). As
  released, duplicates are dropped *before* stripping, so ``"long tail"`` and ``" long tail"``
  both stay.
* one-to-one features: newlines removed; the first class's features are what comes before the
  first ``For``, the second class's what comes after the first ``:``, without its first piece;
  each split at ``_``, stripped, empty items dropped. No duplicate is dropped. Where there is no
  ``For``, the released ``find`` returns -1 and the slice drops the answer's last character; that
  is reproduced too.

The analogous follow-up prompt lists the names the CLIP filter found too close to another class,
joined with ``,`` and with the last character cut (``",".join(names)[:-1]``, as released).
"""

from __future__ import annotations

Messages = list[dict[str, str]]

_ATTRIBUTE = (
    "Q: What are useful visual features for distinguishing a lemur in a photo? \n"
    "A: There are several useful visual features to tell there is a lemur in a photo:\n"
    " _four-limbed primate\n"
    "_black, grey, white, brown, or red-brown\n"
    "_wet and hairless nose with curved nostrils\n"
    "_long tail\n"
    "_large eyes\n"
    "_furry bodies\n"
    "_clawed hands and feet\n"
    "Q: What are useful visual features for distinguishing a {c} in a photo?\n"
    "A: There are several useful visual features to tell there is a {c} in a photo:\n"
    "_"
)

_ANALOGOUS = (
    "Q:What other objects are cats visually similar to?\n"
    "A:\n"
    "_Tiger\n_Lion\n_Leopard\n_Garfield Cat\n_Cat-themed Products\n_Cat Toys\n"
    "Q:What other objects are {c} visually similar to?\n"
    "A:\n"
    "_"
)

_ANALOGOUS_FOLLOWUP = (
    "Q: Helicopter has already appeared in the class set. Please give one more other classes which are "
    "visually similar to airplanes. Give me the class name without other words.\n"
    "A:\n"
    "_Drone\n"
    "Q: {repeated} has already appeared in the class set. Please give {n} more other classes which are "
    "visually similar to {c}. Give me the class name without other words.\n"
    "A:\n"
    "_"
)

_SYNONYM = (
    "Q:What are the synonyms for forest?\n"
    "A:\n"
    "_Woodland\n_Woods\n_Thicket\n_Jungle\n_Timberland\n_Rainforest\n"
    "Q:What are the synonyms for {c}?\n"
    "A:\n"
    "_"
)

_ONE_TO_ONE = (
    "Q: What are different visual features between the river and the lake in a photo? Focus on their key "
    "differences.\n"
    "A: For River:\n"
    "_Flowing water\n"
    "_Narrow and elongated body of water\n"
    "For Lake:\n"
    "_Still or calm water\n"
    "_Larger and more circular or irregular in shape\n"
    "Q: What are different visual features between the {a} and the {b} in a photo? Focus on their key "
    "differences. You should decide the number of attributes to output based on the actual situation, not "
    "just 2. You should follow the format of the examples given above.\n"
    "A: For {a}:\n"
    "_"
)


def spoken(name: str) -> str:
    """The class name as the released generator puts it into a prompt (``_`` becomes a space)."""
    return name.replace("_", " ")


def _user(text: str) -> Messages:
    return [{"role": "user", "content": text}]


def _sub(template: str, **values: str) -> str:
    # str.replace, not str.format: braces inside a class name stay literal
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


def attribute_prompt(c: str) -> Messages:
    return _user(_sub(_ATTRIBUTE, c=spoken(c)))


def analogous_prompt(c: str) -> Messages:
    return _user(_sub(_ANALOGOUS, c=spoken(c)))


def analogous_followup_prompt(c: str, repeated: list[str]) -> Messages:
    """The follow-up after the filter refused ``repeated`` (raw answer items, as released)."""
    return _user(_sub(_ANALOGOUS_FOLLOWUP, repeated=",".join(repeated)[:-1], n=str(len(repeated)), c=spoken(c)))


def synonym_prompt(c: str) -> Messages:
    return _user(_sub(_SYNONYM, c=spoken(c)))


def one_to_one_prompt(a: str, b: str) -> Messages:
    return _user(_sub(_ONE_TO_ONE, a=spoken(a), b=spoken(b)))


# ------------------------------------------------------------------ reading answers
def raw_items(answer: str | None) -> list[str]:
    """``list(set(answer.replace('\\n', '').split('_')))`` in first-occurrence order: the items before
    the released generator strips them (the analogous filter sees these)."""
    if not answer:
        return []
    return list(dict.fromkeys(answer.replace("\n", "").split("_")))


def clean(items: list[str]) -> list[str]:
    """The released ``generate_text`` tail: drop blank items, strip the rest."""
    return [it.strip() for it in items if it.strip()]


def foreign_bullets(answer: str | None) -> bool:
    """Whether an answer lists its items with another bullet ('- ', '* ', '1. ') and no '_': the
    released reader, which splits on '_' only, then makes one garbled item of the whole answer."""
    if not answer or "_" in answer:
        return False
    lines = [ln.strip() for ln in answer.splitlines() if ln.strip()]
    listed = [ln for ln in lines if ln[:2] in ("- ", "* ", "• ") or (ln[:1].isdigit() and ln[1:3] in (". ", ") "))]
    return len(listed) >= 2


def read_list(answer: str | None) -> list[str]:
    """Attribute and synonym items of an answer, as released (see the module docstring)."""
    return clean(raw_items(answer))


def read_pair(answer: str | None) -> tuple[list[str], list[str]]:
    """(features of the first class, features of the second) of a one-to-one answer, as released."""
    if not answer:
        return [], []
    text = answer.replace("\n", "")
    first_end = text.find("For")
    second_start = text.find(":")
    first = text[:first_end]  # find() == -1 cuts the last character, as the released slice does
    second = text[second_start + 1:]
    return clean(first.split("_")), clean(second.split("_")[1:])
