from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may wait on the model hub
# Caches and WordNet data of the tests live in a temporary folder, never in the user's home.
_SCRATCH = tempfile.mkdtemp(prefix="coder-index-tests-")
os.environ["CODER_INDEX_CACHE_DIR"] = os.path.join(_SCRATCH, "cache")
os.environ["NLTK_DATA"] = os.path.join(_SCRATCH, "nltk_data")
# The fault hooks (core.faults: CODER_INDEX_CRASH_AT and the rest) act only in a named test run; the
# processes the tests start inherit the name.
os.environ["CODER_INDEX_TEST_RUN"] = f"pytest-{os.getpid()}"

from tiny_model import write_tiny_model  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"  # ../shared beside the repository

PET_CLASSES = ["Abyssinian", "Bengal", "beagle", "pug", "samoyed"]


def shared_path(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.fail(f"{p} is missing: the tests read ../shared beside the repository")
    return p


class MovableClock:
    """The clock of the file-identity settle rule (``core.file_identity.clock``), moved forward by a test
    instead of sleeping until the files it just wrote count as settled."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def __call__(self) -> float:
        import time

        return time.time() + self.ahead

    def advance(self, seconds: float) -> None:
        self.ahead += seconds


@pytest.fixture
def settle_clock(monkeypatch) -> MovableClock:
    """A short settle time and a clock the test moves: ``settle_clock.advance(s)`` lets ``s`` seconds pass."""
    from coder_index.core import file_identity

    clock = MovableClock()
    monkeypatch.setattr(file_identity, "clock", clock)
    monkeypatch.setattr(file_identity, "SETTLE_SECONDS", 0.3)
    return clock


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-clip"), seed=0)


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory) -> str:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-clip-other"), seed=1)


@pytest.fixture(scope="session")
def encoder(tiny_model):
    from coder_index import ClipEncoder

    return ClipEncoder(tiny_model, device="cpu")


@pytest.fixture(scope="session")
def classes_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("vocab") / "classes.txt"
    p.write_text("\n".join(PET_CLASSES) + "\n", encoding="utf-8")
    return p


@pytest.fixture
def built_index(tmp_path, encoder, classes_file):
    """A fresh index with name texts and the published pet descriptors for five classes."""
    from coder_index.pipeline.build import build_index

    build_index(tmp_path / "idx", classes_file, encoder=encoder, dataset="oxford_pets",
                descriptors=[shared_path("data", "descriptors", "descriptors_pets.json")])
    from coder_index import TextIndex

    return TextIndex.open(tmp_path / "idx", encoder=encoder)


@pytest.fixture(scope="session")
def wordnet_reader():
    """WordNet 3.0 from Debian's wordnet-base (installed by .ci/run), set up for NLTK in a temp dir."""
    from coder_index.textgen.wordnet import SYSTEM_WORDNET, load_wordnet, setup_wordnet

    if not (SYSTEM_WORDNET / "data.noun").is_file():
        pytest.fail("WordNet is not installed: apt-get install wordnet-base wordnet-sense-index (.ci/run does)")
    setup_wordnet(SYSTEM_WORDNET, os.environ["NLTK_DATA"])
    return load_wordnet(os.environ["NLTK_DATA"])


@pytest.fixture(scope="session")
def wordnet_texts(encoder, wordnet_reader):
    from coder_index.textgen.wordnet import WordNetTexts

    return WordNetTexts(encoder, wordnet_reader)


# ---------------------------------------------------------------------------------------------- shared helpers
def run_cli(*args: object, ok: bool = True, code: int | None = None, cwd: Path | None = None,
            env: dict[str, str] | None = None, input: bytes | str | None = None):  # noqa: A002 - CliRunner's word
    """``coder-index ARGS`` in this process, as a user types it (``cwd``: the directory it runs in). ``ok``:
    the exit status must be 0 (``code``: this one; ``ok=False``: any). An exception other than an exit
    fails the test with its traceback, whatever the status asked for."""
    from click.testing import CliRunner

    from coder_index_cli.main import cli

    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        res = CliRunner(env=env).invoke(cli, [str(a) for a in args], input=input)
    finally:
        os.chdir(old)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    if code is not None:
        assert res.exit_code == code, res.output
    elif ok:
        assert res.exit_code == 0, res.output
    return res


CIFAR_CLASSES = ["cat", "ship", "truck", "airplane"]


@pytest.fixture(scope="session")
def cifar_index(tmp_path_factory, tiny_model) -> Path:
    """An index of four CIFAR-10 class names (the tiny model, no LLM): the shard, remote and source tests'."""
    root = tmp_path_factory.mktemp("cifar-index")
    (root / "classes.txt").write_text("\n".join(CIFAR_CLASSES) + "\n")
    run_cli("build", root / "idx", "--classes", root / "classes.txt", "--model", tiny_model, "--llm", "none", "-q")
    return root / "idx"


@pytest.fixture(scope="session")
def methods_env(tmp_path_factory, tiny_model) -> Path:
    """An index with pair texts, a few-shot adapter, a captioned corpus and a folder of 9 images of three
    colour classes: every method can classify and explain there (coder, coder*, the adapter, X-MoRe)."""
    import csv
    import json

    from images import make_colour_classes

    classes = ["red", "green", "blue"]
    root = tmp_path_factory.mktemp("methods")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    pairs = {a: {b: [f"{a} is warmer than {b}", f"a brighter {a}"] for b in classes if b != a} for a in classes}
    knowledge = {"format": "coder-index/knowledge", "version": 1, "provenance": {},
                 "classes": {c: {"attribute": [f"{c} tint", f"{c} hue"], "analogous": [], "synonym": []}
                             for c in classes},
                 "pairs": pairs}
    (root / "k.json").write_text(json.dumps(knowledge))
    run_cli("build", root / "idx", "--classes", root / "classes.txt", "--model", tiny_model, "--knowledge",
            root / "k.json", "-q")
    make_colour_classes(root, classes, {"train": 8, "images": 3}, tint=180, noise=90, seed=3)
    run_cli("fewshot", "fit", root / "train", "--index", root / "idx", "--shots", "4", "--out", root / "adapter",
            "--augment-epochs", "1", "--workers", "0", "--search", "fast", "-q")
    captions = root / "captions.csv"
    with open(captions, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        for c in classes:
            for j in range(8):
                w.writerow([f"{c}/{j}.png", f"a {c} square"])
    run_cli("corpus", "build", root / "corpus", "--images", root / "train", "--captions", captions, "--index",
            root / "idx", "--workers", "0", "-q")
    return root
