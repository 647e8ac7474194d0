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
