"""Turn free-form LLM answers into clean lists.

Models answer in many shapes: bullets, numbers, JSON arrays, a comma-separated line, a preamble
("Sure! Here are ...:") and closing prose. Lines with a list marker win over unmarked prose.
"""

from __future__ import annotations

import json
import re

# A bullet symbol needs a space after it, so "**bold**" is not a bullet. A leading underscore is the
# released ATG prompts' bullet ("_long tail"), with or without a space.
_MARKER = re.compile(r"^\s*(?:[-*•·‣▪◦+–—](?=\s)|_(?=\s*[^\s_])|\(?\d{1,3}[.):\]]|\(?[a-zA-Z][.)](?=\s))\s*")
_REFUSAL = re.compile(
    r"^\s*(?:i'?m sorry|i am sorry|sorry[,.!]|i can(?:no|')t|i cannot|i'?m unable|i am unable|"
    r"as an ai|i won'?t|i will not)", re.IGNORECASE)
_NONE = {"none", "n/a", "no synonyms", "there are none", "nothing"}
MAX_ITEM_CHARS = 300  # a list item longer than this is prose, not a feature or a name


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.match(text or ""))


def _strip_fences(text: str) -> str:
    text = text.strip()
    if text.startswith("```"):
        text = re.sub(r"^```[a-zA-Z]*\n?", "", text)
        text = re.sub(r"\n?```\s*$", "", text)
    return text.strip()


def _clean_item(s: str) -> str:
    s = s.strip().strip("*_`\"'“”‘’").strip()
    s = re.sub(r"\s+", " ", s)
    return s.rstrip(".;,").strip()


def dedupe(items: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for it in items:
        key = it.lower()
        if it and key not in seen:
            seen.add(key)
            out.append(it)
    return out


def parse_list(answer: str | None, *, names: bool = False) -> list[str]:
    """Items of a list answer, in order, without markers, blanks, prose or duplicates.

    ``names=True`` (analogous classes, synonyms) also splits a single comma-separated line and
    drops long items, which are sentences rather than names.
    """
    if not answer or is_refusal(answer):
        return []
    text = _strip_fences(answer)
    try:
        obj = json.loads(text)
        if isinstance(obj, list) and all(isinstance(x, str) for x in obj):
            return dedupe([c for c in (_clean_item(x) for x in obj)
                           if c and c.lower() not in _NONE and len(c) <= MAX_ITEM_CHARS])
    except (json.JSONDecodeError, ValueError):
        pass
    marked, unmarked = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        m = _MARKER.match(line)
        body = _clean_item(line[m.end():] if m else line)
        if not body:
            continue
        if m:
            marked.append(body)
        elif not line.rstrip().endswith(":"):  # "Here are some features:" is a preamble, not an item
            unmarked.append(body)
    items = marked if marked else unmarked
    if names:
        if len(items) == 1 and "," in items[0]:
            items = [_clean_item(x) for x in re.split(r",|\band\b", items[0])]
        items = [it for it in items if 0 < len(it.split()) <= 6]
    return dedupe([it for it in items if it.lower() not in _NONE and any(ch.isalpha() for ch in it)
                   and len(it) <= MAX_ITEM_CHARS])


def parse_pair(answer: str | None, a: str, b: str) -> tuple[list[str], list[str]]:
    """Features of ``a`` and of ``b`` from a two-section answer ("a:" list, then "b:" list).

    Also accepts inline "a: feature" lines. Returns ([], []) when the sections cannot be told apart.
    """
    if not answer or is_refusal(answer):
        return [], []
    sides: dict[str, list[str]] = {"a": [], "b": []}
    # longest name first, so "wild cat" is not taken for "cat"
    names = sorted([(a.lower(), "a"), (b.lower(), "b")], key=lambda x: -len(x[0]))
    current = None
    for raw in _strip_fences(answer).splitlines():
        line = raw.strip()
        if not line:
            continue
        m = _MARKER.match(line)
        body = line[m.end():] if m else line
        header = re.sub(r"[*_#`]", "", body).strip()
        low = header.lower()
        matched, rest = None, ""
        for name, side in names:
            # "cat:", "The cat:", "Features of a cat:", and the released prompts' "For cat:"
            prefix = rf"^(?:for )?(?:features of )?(?:an? |the )?{re.escape(name)}s?"
            if re.match(prefix + r"\s*(?:features?|traits?)?\s*:", low):  # "cat:" / "cat features: ..."
                matched, rest = side, header.split(":", 1)[1]
                break
            if not m and re.match(prefix + r"\b", low) and len(low.split()) <= len(name.split()) + 2:
                matched = side  # an unmarked short heading such as "**Cat**" or "The cat"
                break
        if matched:
            current = matched
            if _clean_item(rest):
                sides[current].append(_clean_item(rest))
            continue
        if current and (m or not line.endswith(":")):
            item = _clean_item(body)
            if item and any(ch.isalpha() for ch in item) and len(item) <= MAX_ITEM_CHARS:
                sides[current].append(item)
    return dedupe(sides["a"]), dedupe(sides["b"])
