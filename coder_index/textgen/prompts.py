"""The prompts of the Auto Text Generator (paper Sec. 4.2; METHODS.md §2)."""

from __future__ import annotations

Messages = list[dict[str, str]]

SYSTEM = "You are a helpful assistant that answers with plain lists, one item per line starting with '- '."

# Few-shot worked example, as in the paper's (and VCD's) attribute prompt.
_ATTRIBUTE_EXAMPLE = """Q: What are useful visual features for distinguishing a lemur in a photo?
A: There are several useful visual features to tell there is a lemur in a photo:
- four-limbed primate
- black, grey, white, brown, or red-brown
- wet and hairless nose with curved nostrils
- long tail
- large eyes
- furry bodies
- clawed hands and feet
"""

_ANALOGOUS_EXAMPLE = """Q: What other categories are a lemur visually similar to?
A: A lemur is visually similar to:
- monkey
- squirrel
- raccoon
- loris
- sloth
"""


def _user(text: str) -> Messages:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


def attribute_prompt(c: str) -> Messages:
    return _user(f"{_ATTRIBUTE_EXAMPLE}\nQ: What are useful visual features for distinguishing a {c} in a photo?\n"
                 f"A: There are several useful visual features to tell there is a {c} in a photo:")


def analogous_prompt(c: str, exclude: list[str] | None = None, wanted: int | None = None) -> Messages:
    text = (f"{_ANALOGOUS_EXAMPLE}\nQ: What other categories are a {c} visually similar to? "
            "Answer with category names only.")
    if exclude:
        text += (f" Do not list any of these: {', '.join(exclude)}."
                 + (f" Give {wanted} other categories." if wanted else ""))
    return _user(text + f"\nA: A {c} is visually similar to:")


def synonym_prompt(c: str) -> Messages:
    return _user(f"Q: What are other names (synonyms) for a {c}, as used for the same kind of thing in a photo? "
                 "Answer with names only; answer 'none' if there are none.\nA:")


def one_to_one_prompt(a: str, b: str) -> Messages:
    return _user(f"Q: What are the different visual features between a {a} and a {b} in a photo? "
                 "Focus on the key differences.\nAnswer with two lists, exactly in this form:\n"
                 f"{a}:\n- a feature of the {a}\n{b}:\n- a feature of the {b}\nA:")
