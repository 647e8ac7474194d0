"""Reading files other people wrote: bounded JSON and a small schema check with JSON paths.

Knowledge files, descriptor files, CuPL prompt files and the released expert knowledge come from
outside. They are validated once, at the boundary: size and nesting depth are bounded *before* the
JSON parser runs (a 200,000-level array would otherwise end in a RecursionError), then every field
is checked for type and size, and an error names the file, the JSON path of the bad field and what
was expected.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coder_index.core.errors import InputFormatError

MAX_BYTES = 512 * 1024 * 1024
MAX_DEPTH = 32
MAX_TEXT = 4000          # characters of one text (an attribute, a synonym, a sentence)
MAX_ITEMS = 100_000      # entries of one list or object
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


def open_regular_file(path: str | Path) -> io.BufferedReader:
    """Open ``path`` for reading only if it is a regular file (or a link to one). O_NONBLOCK makes
    opening a FIFO return at once instead of waiting for a writer; fstat then tells what was opened,
    so a FIFO, socket or device given as an input (or swapped in meanwhile) never blocks a read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotARegularFile(errno.EINVAL, "not a regular file (a FIFO, socket, device or directory)", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class NotARegularFile(OSError):
    pass


def read_bytes(path: str | Path, what: str, *, max_bytes: int = MAX_BYTES) -> bytes:
    """The bytes of a user's input file: a regular file of bounded size, or a clear InputFormatError."""
    path = Path(path)
    try:
        with open_regular_file(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise InputFormatError(f"{what} {path} has {size} bytes, more than the {max_bytes} coder-index reads "
                                       "from such a file")
            return f.read()
    except NotARegularFile:
        raise InputFormatError(f"{what} {path} is not a regular file (a FIFO, socket, device or directory)") from None
    except FileNotFoundError:
        raise InputFormatError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise InputFormatError(f"{what} {path} is a directory, not a file") from None
    except PermissionError:
        raise InputFormatError(f"{what} {path} cannot be read (permission denied)") from None


def read_text(path: str | Path, what: str, *, max_bytes: int = MAX_BYTES) -> str:
    """A user's UTF-8 text file (class list, CSV, mapping), read with the checks of ``read_bytes``."""
    raw = read_bytes(path, what, max_bytes=max_bytes)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputFormatError(f"{what} {path} is not UTF-8 text ({exc}); save it as UTF-8") from None


def json_depth(raw: bytes) -> int:
    """Deepest nesting of arrays/objects, counted without parsing (string contents ignored)."""
    skeleton = np.frombuffer(_STRINGS.sub(b'""', raw), dtype=np.uint8)
    step = np.zeros(skeleton.shape, dtype=np.int32)
    step[(skeleton == ord("[")) | (skeleton == ord("{"))] = 1
    step[(skeleton == ord("]")) | (skeleton == ord("}"))] = -1
    return int(np.cumsum(step).max(initial=0))


def read_json(path: str | Path, *, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """Parse a JSON file after bounding its size and depth; pickle files are refused (loading them can
    run code)."""
    path = Path(path)
    if path.suffix in (".pkl", ".pickle", ".pt", ".pth"):
        raise InputFormatError(f"{path}: pickle files are refused (loading them can run arbitrary code); "
                               "convert it to JSON")
    raw = read_bytes(path, "JSON file", max_bytes=max_bytes)
    if raw.startswith(_PICKLE_MAGIC):
        raise InputFormatError(f"{path} is a pickle file; pickle is refused (it can run code), use JSON")
    depth = json_depth(raw)
    if depth > max_depth:
        raise InputFormatError(f"{path} nests {depth} levels deep; the formats coder-index reads need at most "
                               f"{max_depth}")
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputFormatError(f"{path} is not valid JSON: {exc}") from None


# ----------------------------------------------------------------------------------- schemas
@dataclass(frozen=True)
class Text:
    max_len: int = MAX_TEXT

    def describe(self) -> str:
        return f"a string of at most {self.max_len} characters"


@dataclass(frozen=True)
class ListOf:
    item: Any
    max_items: int = MAX_ITEMS

    def describe(self) -> str:
        if isinstance(self.item, Text):
            return f"a list of strings (each at most {self.item.max_len} characters)"
        return f"a list whose items are {self.item.describe()}"


@dataclass(frozen=True)
class MapOf:
    value: Any
    max_items: int = 10 * MAX_ITEMS
    key: Text = field(default_factory=lambda: Text(1000))

    def describe(self) -> str:
        return f"an object whose values are {self.value.describe()}"


@dataclass(frozen=True)
class Record:
    fields: dict[str, Any]
    required: tuple[str, ...] = ()

    def describe(self) -> str:
        return "an object with " + ", ".join(f"'{k}'" for k in self.fields)


@dataclass(frozen=True)
class Anything:
    def describe(self) -> str:
        return "any JSON value"


def _type(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(v), type(v).__name__)


def check(value: Any, schema: Any, where: str, jpath: str = "$") -> Any:
    """Raise InputFormatError naming ``where`` and the JSON path if ``value`` does not fit ``schema``."""
    def fail(expected: str, got: str | None = None) -> None:
        raise InputFormatError(f"{where}: {jpath} must be {expected}, got {got or _type(value)}")

    if isinstance(schema, Anything):
        return value
    if isinstance(schema, Text):
        if not isinstance(value, str):
            fail(schema.describe())
        if len(value) > schema.max_len:
            fail(schema.describe(), f"{len(value)} characters")
        return value
    if isinstance(schema, ListOf):
        if not isinstance(value, list):
            fail(schema.describe())
        if len(value) > schema.max_items:
            fail(f"a list of at most {schema.max_items} items", f"{len(value)}")
        for i, v in enumerate(value):
            check(v, schema.item, where, f"{jpath}[{i}]")
        return value
    if isinstance(schema, MapOf):
        if not isinstance(value, dict):
            fail(schema.describe())
        if len(value) > schema.max_items:
            fail(f"an object of at most {schema.max_items} entries", f"{len(value)}")
        for k, v in value.items():
            check(k, schema.key, where, f"{jpath} key {k[:40]!r}")
            check(v, schema.value, where, f"{jpath}[{json.dumps(k[:80], ensure_ascii=False)}]")
        return value
    if isinstance(schema, Record):
        if not isinstance(value, dict):
            fail(schema.describe())
        for k in schema.required:
            if k not in value:
                raise InputFormatError(f"{where}: {jpath} has no '{k}'")
        for k, sub in schema.fields.items():
            if k in value and value[k] is not None:
                check(value[k], sub, where, f"{jpath}.{k}")
        return value
    raise TypeError(f"unknown schema {schema!r}")


TEXTS = ListOf(Text())
DESCRIPTORS = MapOf(TEXTS)                     # {class: [descriptor, ...]} and CuPL {class: [sentence, ...]}
KNOWLEDGE_CLASS = Record({"attribute": TEXTS, "attribute_text": TEXTS, "analogous": TEXTS, "synonym": TEXTS,
                          "source": MapOf(Text(200))})
KNOWLEDGE = Record({"format": Text(100), "version": Anything(), "classes": MapOf(KNOWLEDGE_CLASS),
                    "pairs": MapOf(MapOf(TEXTS)), "provenance": Anything()}, required=("classes",))
EXPERT_SYNONYMS = ListOf(Record({"syno": TEXTS}, required=("syno",)), max_items=10 * MAX_ITEMS)
EXPERT_PAIRS = MapOf(MapOf(TEXTS))
