"""WordNet: data setup for NLTK, CLIP-chosen senses, synonyms, and the offline text generator.

NLTK reads WordNet from ``<nltk_data>/corpora/wordnet``. Debian's ``wordnet-base`` and
``wordnet-sense-index`` install the WordNet 3.0 files in /usr/share/wordnet, but NLTK also wants a
``lexnames`` file (the 45 lexicographer file names), which ships in this package's data.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from coder_index.core.errors import CoderIndexError

if TYPE_CHECKING:
    from coder_index.model.encoder import ClipEncoder

log = logging.getLogger(__name__)

SYSTEM_WORDNET = Path("/usr/share/wordnet")
_REQUIRED = ("data.noun", "index.noun", "noun.exc", "data.verb", "index.verb", "data.adj", "index.adj",
             "data.adv", "index.adv")
_HOW_TO = ("Get WordNet 3.0 one of two ways: (1) offline, from the system package: "
           "`apt-get install wordnet-base wordnet-sense-index` then `coder-index setup wordnet` "
           "(or `--from DIR` for another WordNet 3.0 dict folder); (2) online: `coder-index setup wordnet "
           "--download` (runs nltk.download('wordnet')).")


class WordNetMissing(CoderIndexError):
    pass


def default_nltk_dir() -> Path:
    return Path(os.environ.get("NLTK_DATA", "").split(os.pathsep)[0] or os.path.expanduser("~/nltk_data"))


def _lexnames_text() -> str:
    try:
        return resources.files("coder_index.data").joinpath("wordnet_lexnames").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        return (Path(__file__).resolve().parents[1] / "data" / "wordnet_lexnames").read_text(encoding="utf-8")


def setup_wordnet(source: str | Path | None = None, target: str | Path | None = None,
                  download: bool = False) -> Path:
    """Make an NLTK-readable WordNet under ``target`` (an nltk_data folder). Returns the corpus dir."""
    target = Path(target) if target else default_nltk_dir()
    dest = target / "corpora" / "wordnet"
    if download:
        import nltk

        if not nltk.download("wordnet", download_dir=str(target), quiet=True):
            raise WordNetMissing(f"nltk.download('wordnet') failed (no internet?). {_HOW_TO}")
        return dest
    src = Path(source) if source else SYSTEM_WORDNET
    missing = [f for f in _REQUIRED if not (src / f).is_file()]
    if missing:
        raise WordNetMissing(f"{src} is not a WordNet 3.0 dict folder (missing {', '.join(missing[:4])}). {_HOW_TO}")
    dest.mkdir(parents=True, exist_ok=True)
    # Copy rather than link: NLTK refuses files that resolve outside its data path.
    for f in src.iterdir():
        if f.is_file():
            shutil.copyfile(f, dest / f.name)
    (dest / "lexnames").write_text(_lexnames_text(), encoding="utf-8")
    load_wordnet(target, auto_setup=False)  # prove it reads
    return dest


_READERS: dict[str, Any] = {}


def load_wordnet(nltk_dir: str | Path | None = None, *, auto_setup: bool = True) -> Any:
    """A WordNetCorpusReader. Sets itself up from /usr/share/wordnet when NLTK finds no data."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    root = Path(nltk_dir) if nltk_dir else default_nltk_dir()
    cache_key = str(root)
    if cache_key in _READERS:
        return _READERS[cache_key]
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    corpus = root / "corpora" / "wordnet"
    if not (corpus / "lexnames").is_file():
        if not auto_setup:
            raise WordNetMissing(f"no WordNet data in {corpus}. {_HOW_TO}")
        if all((SYSTEM_WORDNET / f).is_file() for f in _REQUIRED):
            log.info("setting up WordNet from %s into %s", SYSTEM_WORDNET, root)
            setup_wordnet(SYSTEM_WORDNET, root)
        else:
            try:
                reader = nltk.corpus.wordnet
                reader.ensure_loaded()
                _READERS[cache_key] = reader
                return reader
            except LookupError:
                raise WordNetMissing(f"WordNet data not found (looked in {corpus}). {_HOW_TO}") from None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": not used here
        reader = WordNetCorpusReader(str(corpus), None)
    _READERS[cache_key] = reader
    return reader


def _lemma_text(name: str) -> str:
    return name.replace("_", " ")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


@dataclass
class WordNetEntry:
    synset: str | None
    synonyms: list[str] = field(default_factory=list)
    attribute: list[str] = field(default_factory=list)       # phrases for "{c} which has {a}"
    attribute_text: list[str] = field(default_factory=list)  # full sentences
    analogous: list[str] = field(default_factory=list)       # unfiltered sister terms


class WordNetTexts:
    """Senses chosen in CLIP space, and texts derived from them."""

    def __init__(self, encoder: ClipEncoder, reader: Any | None = None, max_sisters: int = 40) -> None:
        from coder_index.model.encoder import RANDOM_WEIGHTS

        self.encoder = encoder
        self.wn = reader or load_wordnet()
        self.max_sisters = max_sisters
        # Untrained weights cannot tell 'dog' the animal from 'dog' the pawl: WordNet's own order
        # (its most frequent sense first) is then the better judge.
        self.sense_choice = "wordnet-order" if getattr(encoder, "pretrained", None) == RANDOM_WEIGHTS else "clip"

    def synsets(self, name: str) -> list[Any]:
        return self.wn.synsets(name.strip().replace(" ", "_"), pos="n")

    def choose_senses(self, names: list[str]) -> dict[str, Any]:
        """For each name, the noun synset whose definition is nearest to ``a photo of a {name}.`` in
        CLIP space (the first sense is often not the visual one: 'crane' the writer). All
        definitions and queries are encoded in one batch."""
        cands = {n: self.synsets(n) for n in names}
        queries = [n for n in names if cands[n]]
        if not queries:
            return {n: None for n in names}
        if self.sense_choice == "wordnet-order":
            log.warning("WordNet senses: the model's weights are untrained (--pretrained random), so each name takes "
                        "WordNet's first (most frequent) sense instead of the one CLIP finds nearest a photo of it")
            return {n: (cands[n][0] if cands[n] else None) for n in names}
        defs = [s.definition() for n in queries for s in cands[n]]
        q_emb = self.encoder.encode_texts([f"a photo of a {n}." for n in queries])
        d_emb = self.encoder.encode_texts(defs)
        out: dict[str, Any] = {n: None for n in names}
        pos = 0
        for i, n in enumerate(queries):
            k = len(cands[n])
            sims = d_emb[pos:pos + k] @ q_emb[i]
            out[n] = cands[n][int(np.argmax(sims))]
            pos += k
        return out

    def entries(self, names: list[str]) -> dict[str, WordNetEntry]:
        senses = self.choose_senses(names)
        return {n: self._entry(n, senses[n]) for n in names}

    def _entry(self, name: str, synset: Any) -> WordNetEntry:
        if synset is None:
            return WordNetEntry(None)
        low = name.lower()
        synonyms = [t for t in (_lemma_text(x) for x in synset.lemma_names()) if t.lower() != low]
        attribute_text = [f"{name}: {synset.definition()}."]
        seen_hyper: list[str] = []
        frontier = synset.hypernyms() + synset.instance_hypernyms()
        for _ in range(2):  # parents and grandparents: "a type of cyprinid", "a type of cypriniform fish"
            nxt = []
            for h in frontier:
                word = _lemma_text(h.lemma_names()[0])
                if word not in seen_hyper:
                    seen_hyper.append(word)
                    attribute_text.append(f"{name}, a type of {word}.")
                nxt += h.hypernyms()
            frontier = nxt
        parts = [_lemma_text(p.lemma_names()[0]) for p in synset.part_meronyms()[:6]]
        attribute = [f"{_article(p)} {p}" for p in parts]
        sisters: list[str] = []
        for h in synset.hypernyms():
            for s in h.hyponyms():
                word = _lemma_text(s.lemma_names()[0])
                if s != synset and word.lower() != low and word not in sisters:
                    sisters.append(word)
        return WordNetEntry(synset.name(), synonyms, attribute, attribute_text, sisters[: self.max_sisters])
