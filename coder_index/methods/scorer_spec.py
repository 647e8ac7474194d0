"""What a classify run computes per image, as plain data, and the scorer built from it.

The CLI, the Python API and every engine go through ``build_scorer``: an engine that runs elsewhere
(``engines.ray_engine``) ships the ``ScorerSpec`` to its workers, and each builds the same scorer
beside its own open index, so a method behaves the same on every engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coder_index.core.choices import XMORE_NORMALIZERS, XMORE_RETRIEVALS
from coder_index.methods.predict import coder_classifier
from coder_index.methods.scorers import CoderScorer, XMoreScorer

if TYPE_CHECKING:
    from coder_index.stores.text_index import TextStore

ZERO_SHOT_METHODS = ("coder", "xmore", "coder+xmore")


@dataclass(frozen=True)
class ScorerSpec:
    top_k: int = 5
    method: str = "coder"               # coder | xmore | coder+xmore
    rerank: bool = False                # CODER*: one-to-one rerank of the stage-1 top 5
    gap_threshold: float | None = None  # rerank only images whose top-1 minus top-2 is below this
    rerank_chunk: int = 2048            # images per rerank step
    adapter: str | None = None          # a CODER-Adapter directory (few-shot)
    corpus: str | None = None           # an X-MoRe corpus directory
    retrieve_k: int = 16                # corpus images per image (X-MoRe)
    candidates: int = 0                 # > 0: stage 1 on each image's M candidate classes only
    normalizer: str | None = None       # X-MoRe: corpus | set | running (None: running for a cvpr24 index, else corpus)
    retrieval: str | None = None        # X-MoRe: nearest | released (None: released for a cvpr24 index, else nearest)

    def check(self) -> None:
        """Refuse combinations that mean nothing, with the fix."""
        if self.method not in ZERO_SHOT_METHODS:
            raise ValueError(f"method must be one of {', '.join(ZERO_SHOT_METHODS)}, got {self.method!r}")
        if sum([self.rerank, bool(self.adapter), self.method != "coder"]) > 1:
            raise ValueError("--rerank, --adapter and --method xmore/coder+xmore are separate methods; use one")
        if self.method != "coder" and not self.corpus:
            raise ValueError(f"--method {self.method} needs --corpus CORPUS_DIR")
        if self.candidates < 0:
            raise ValueError("--candidates must be 0 (dense) or a positive number of classes")
        if self.candidates and (self.adapter or self.method != "coder"):
            raise ValueError("--candidates applies to CODER's stage 1 (coder and --rerank); the adapter and "
                             "X-MoRe score every class")
        if self.normalizer is not None and self.method == "coder":
            raise ValueError("--xmore-normalizer applies to --method xmore and coder+xmore")
        if self.retrieval is not None and self.method == "coder":
            raise ValueError("--xmore-retrieval applies to --method xmore and coder+xmore")
        if self.retrieval not in (None, *XMORE_RETRIEVALS):
            raise ValueError(f"--xmore-retrieval must be one of {', '.join(XMORE_RETRIEVALS)}, got "
                             f"{self.retrieval!r}")
        if self.normalizer not in (None, *XMORE_NORMALIZERS):
            raise ValueError(f"--xmore-normalizer must be one of {', '.join(XMORE_NORMALIZERS)}, got "
                             f"{self.normalizer!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def xmore_normalizer(index: TextStore, spec: ScorerSpec) -> str:
    """X-MoRe's normaliser: as asked, else the released running sums for a ``--preset cvpr24`` index
    (it reproduces the released numbers), else the corpus's own (an image's answer is its own)."""
    if spec.normalizer is not None:
        return spec.normalizer
    return "running" if index.recipe.is_released else "corpus"


def xmore_retrieval(index: TextStore, spec: ScorerSpec) -> str:
    """X-MoRe's retrieval rule: as asked, else the released code's for a ``--preset cvpr24`` index, else
    the captions of the K nearest corpus images."""
    if spec.retrieval is not None:
        return spec.retrieval
    return "released" if index.recipe.is_released else "nearest"


def build_scorer(index: TextStore, spec: ScorerSpec, *, generator: Any = None, llm_model: str | None = None,
                 progress: bool = False, note: Callable[[str], None] | None = None) -> CoderScorer | XMoreScorer:
    """The scorer for ``spec`` over ``index``. ``generator`` (an ``AutoTextGenerator``) lets the rerank
    generate missing pair texts; without it the rerank uses the pair texts stored in the index.
    ``note`` receives one-line messages for the user (e.g. that the rerank has no pair texts)."""
    spec.check()
    note = note or (lambda _: None)
    if spec.method != "coder":
        from coder_index.methods.xmore.predict import XMore
        from coder_index.stores.corpus import Corpus

        corpus = Corpus(spec.corpus, index.fingerprint, device=index.compute_device)
        xmore = XMore(index, corpus, k=spec.retrieve_k, retrieval=xmore_retrieval(index, spec))
        return XMoreScorer(xmore, spec.method, spec.top_k,
                           normalizer=xmore_normalizer(index, spec))
    if spec.adapter:
        from coder_index.methods.fewshot.model import FewShotModel

        fs = FewShotModel(Path(spec.adapter), index)
        return CoderScorer(index, spec.top_k, logits=fs.logits, method="coder-adapter",
                           settings={"adapter": fs.provenance()})
    reranker = None
    settings: dict[str, Any] = {}
    if spec.rerank:
        from coder_index.methods.pair_stage import PairReranker

        if generator is None and index.counts()["pair_texts"] == 0:
            note("rerank unavailable: it needs one-to-one pair texts, the index has none and no LLM is asked for "
                 "them here; using stage 1 (CODER) only. Import pair texts with `build --knowledge`, or let "
                 "`classify --rerank` generate them with an LLM.")
        else:
            if generator is None:
                note("reranking with the pair texts already in the index (no LLM is asked for missing ones); "
                     "missing pairs count as ties")
            reranker = PairReranker(index, generator, gap_threshold=spec.gap_threshold, progress=progress)
            settings["rerank"] = {"top": 5, "gap_threshold": spec.gap_threshold,
                                  "llm": None if generator is None else llm_model}
    candidates = None
    if spec.candidates:
        from coder_index.methods.candidates import CandidateClassifier

        candidates = CandidateClassifier(coder_classifier(index), spec.candidates)
        settings["candidates"] = candidates.m
    return CoderScorer(index, spec.top_k, reranker=reranker, settings=settings, rerank_chunk=spec.rerank_chunk,
                       candidates=candidates)
