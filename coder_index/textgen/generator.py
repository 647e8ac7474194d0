"""AutoTextGenerator: the texts CODER is built from (paper Sec. 4.2; METHODS.md §2).

With an LLM: attributes (few-shot prompt), analogous classes (then the CLIP filter, asking again
for replacements), synonyms (WordNet by default, or the LLM), one-to-one pair features on demand.
Without one (``llm=None``): an offline generator from WordNet alone, labelled ``source=wordnet``.

Two prompt sets: coder-index's own (``prompts="default"``: a system message asking for plain lists,
answers read by the tolerant ``parse`` module) and the released generator's (``prompts="cvpr24"``:
its messages and answer reading word for word, ``released`` module), which the ``cvpr24`` preset
uses.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from coder_index.core.redaction import redact_url
from coder_index.textgen import released
from coder_index.textgen.knowledge import Knowledge
from coder_index.textgen.llm import BudgetExhausted, LLMClient
from coder_index.textgen.parse import is_refusal, parse_list, parse_pair
from coder_index.textgen.prompts import analogous_prompt, attribute_prompt, one_to_one_prompt, synonym_prompt

if TYPE_CHECKING:
    from coder_index.model.encoder import ClipEncoder

GENERAL_KINDS = ("attribute", "analogous", "synonym")
PROMPT_SETS = ("default", "cvpr24")


class AnalogousFilter:
    """Drops analogous names that would describe a competing class of the vocabulary: cosine of
    ``a photo of {name}`` to any *other* class above ``threshold`` (0.9 in the released code)."""

    def __init__(self, encoder: ClipEncoder, classes: list[str], threshold: float = 0.9) -> None:
        self.encoder = encoder
        self.classes = list(classes)
        self.col = {c: i for i, c in enumerate(self.classes)}
        self.lower = {c.lower() for c in self.classes}
        self.threshold = threshold
        self.class_emb = encoder.encode_texts([f"a photo of {c}" for c in self.classes])

    def keep(self, cls: str, candidates: list[str], already: Iterable[str] = ()) -> list[str]:
        """Candidates that survive, in order (names equal to a vocabulary class never survive)."""
        seen = {a.lower() for a in already} | {cls.lower()}
        fresh = []
        for c in candidates:
            if c.lower() not in seen and c.lower() not in self.lower:
                fresh.append(c)
                seen.add(c.lower())
        if not fresh:
            return []
        sims = self.encoder.encode_texts([f"a photo of {c}" for c in fresh]) @ self.class_emb.T
        if cls in self.col:
            sims[:, self.col[cls]] = -np.inf
        ok = sims.max(axis=1) <= self.threshold if sims.shape[1] else np.ones(len(fresh), bool)
        return [c for c, keep in zip(fresh, ok, strict=True) if keep]

    def too_close(self, cls: str, names: list[str]) -> np.ndarray:
        """Per name: is ``a photo of {name}`` within the threshold of another class? No other test
        (the released filter: names equal to a class, or repeated, are judged by CLIP alone)."""
        if not names or not self.classes:
            return np.zeros(len(names), dtype=bool)
        sims = self.encoder.encode_texts([f"a photo of {c}" for c in names]) @ self.class_emb.T
        if cls in self.col:
            sims[:, self.col[cls]] = -np.inf  # its own class is not 'another class'
        return sims.max(axis=1) > self.threshold

    def rank(self, cls: str, names: list[str]) -> list[str]:
        """``names`` ordered by CLIP similarity to ``cls`` (most confusable first)."""
        if not names or cls not in self.col:
            return names
        sims = self.encoder.encode_texts([f"a photo of {c}" for c in names]) @ self.class_emb[self.col[cls]]
        return [names[i] for i in np.argsort(-sims, kind="stable")]


@dataclass
class GenerationStats:
    classes: int
    with_kind: dict[str, int] = field(default_factory=dict)      # classes with >= 1 text of the kind
    missing: dict[str, list[str]] = field(default_factory=dict)  # classes left without the kind
    not_in_wordnet: list[str] = field(default_factory=list)
    analogous_dropped: int = 0
    analogous_followups: int = 0
    stopped_by_budget: bool = False
    seconds: float = 0.0
    llm_summary: str | None = None
    failed: dict[str, list[str]] = field(default_factory=dict)   # kind -> classes whose LLM request got no answer
    # cvpr24: classes whose answer came with '- ' (or numbered) bullets, which the released reader garbles
    foreign_bullets: list[str] = field(default_factory=list)


@dataclass
class DryRun:
    prompts: int
    cached: int
    kinds: list[str]


async def _settle(tasks: list[asyncio.Future]) -> None:
    """Cancel what is still running and collect every outcome, so that an error in one request
    (re-raised by the caller) leaves no 'Task exception was never retrieved' behind."""
    for t in tasks:
        if not t.done():
            t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class AutoTextGenerator:
    def __init__(self, encoder: ClipEncoder, llm: LLMClient | None = None, *, synonym_source: str = "wordnet",
                 analogous_threshold: float = 0.9, max_rounds: int = 6, max_analogous: int = 8,
                 wordnet: Any | None = None, filter_encoder: ClipEncoder | None = None,
                 prompts: str = "default") -> None:
        """``filter_encoder`` is the CLIP model of the analogous filter; by default the target model
        (``encoder``). The released code always filters with ViT-L-14 whatever the target model.
        ``prompts``: ``default`` (coder-index's) or ``cvpr24`` (the released generator's messages,
        answer reading and analogous follow-up loop)."""
        if prompts not in PROMPT_SETS:
            raise ValueError(f"prompts must be one of {', '.join(PROMPT_SETS)}, got {prompts!r}")
        if synonym_source not in ("wordnet", "llm"):
            raise ValueError("synonym_source must be 'wordnet' or 'llm'")
        if synonym_source == "llm" and llm is None:
            raise ValueError("synonym_source='llm' needs an LLM; use the default WordNet synonyms with --llm none")
        self.encoder = encoder
        self.filter_encoder = filter_encoder or encoder
        self.llm = llm
        self.synonym_source = synonym_source
        self.threshold = analogous_threshold
        self.max_rounds = max_rounds
        self.max_analogous = max_analogous
        self._wordnet = wordnet
        self.prompts = prompts

    @property
    def released(self) -> bool:
        return self.prompts == "cvpr24"

    def _prompt(self, kind: str, c: str) -> list[dict[str, str]]:
        """The first prompt of a kind for class ``c`` in this generator's prompt set."""
        if self.released:
            return {"attribute": released.attribute_prompt, "analogous": released.analogous_prompt,
                    "synonym": released.synonym_prompt}[kind](c)
        return {"attribute": attribute_prompt, "analogous": analogous_prompt, "synonym": synonym_prompt}[kind](c)

    def _read(self, answer: str | None, kind: str) -> list[str]:
        if self.released:
            return released.read_list(answer)
        return parse_list(answer, names=kind != "attribute")

    def _usable(self, kind: str) -> Any:
        """Whether an answer is worth keeping (else it is asked again): a refusal never is."""
        return lambda t: not is_refusal(t) and bool(self._read(t, kind))

    @property
    def source(self) -> str:
        return f"llm:{self.llm.config.model}" if self.llm else "wordnet"

    def _wordnet_texts(self) -> Any:
        from coder_index.textgen.wordnet import WordNetTexts

        if self._wordnet is None:
            self._wordnet = WordNetTexts(self.encoder)
        return self._wordnet

    def _llm_kinds(self, kinds: Iterable[str]) -> list[str]:
        if self.llm is None:
            return []
        llm_synonyms = self.synonym_source == "llm"
        return [k for k in kinds if k in ("attribute", "analogous") or (k == "synonym" and llm_synonyms)]

    # ------------------------------------------------------------------ planning
    def dry_run(self, classes: list[str], kinds: Iterable[str] = GENERAL_KINDS) -> DryRun:
        """How many prompts a run would send now (first rounds; analogous follow-ups come on top)."""
        llm_kinds = self._llm_kinds(kinds)
        total = cached = 0
        for c in classes:
            for k in llm_kinds:
                total += 1
                cached += self.llm.cached(self._prompt(k, c)) is not None  # type: ignore[union-attr]
        return DryRun(total - cached, cached, llm_kinds)

    # ------------------------------------------------------------------ generation
    def generate(self, classes: list[str], kinds: Iterable[str] = GENERAL_KINDS,
                 progress: bool = False) -> tuple[Knowledge, GenerationStats]:
        kinds = [k for k in GENERAL_KINDS if k in set(kinds)]
        t0 = time.perf_counter()
        knowledge = Knowledge(provenance=self._provenance(kinds))
        stats = GenerationStats(len(classes))
        filt = None
        if "analogous" in kinds:
            # the released generator speaks (and filters) class names with '_' as a space
            names = [released.spoken(c) for c in classes] if self.released else classes
            filt = AnalogousFilter(self.filter_encoder, names, self.threshold)

        wordnet_kinds = [k for k in kinds if k not in self._llm_kinds(kinds)]
        if wordnet_kinds:
            self._from_wordnet(classes, wordnet_kinds, filt, knowledge, stats)
        if self._llm_kinds(kinds):
            asyncio.run(self._from_llm(classes, self._llm_kinds(kinds), filt, knowledge, stats, progress))
            stats.llm_summary = self.llm.usage.summary()  # type: ignore[union-attr]
        for k in kinds:
            have = {c for c in classes
                    if knowledge.get(c, k) or (k == "attribute" and knowledge.get(c, "attribute_text"))}
            stats.with_kind[k] = len(have)
            stats.missing[k] = [c for c in classes if c not in have]
        knowledge.provenance["not_in_wordnet"] = stats.not_in_wordnet
        if self._wordnet is not None:  # how senses were chosen: by CLIP, or WordNet's order for untrained weights
            knowledge.provenance["wordnet_senses"] = self._wordnet.sense_choice
        stats.seconds = time.perf_counter() - t0
        return knowledge, stats

    def _provenance(self, kinds: list[str]) -> dict[str, Any]:
        from coder_index import __version__

        prov: dict[str, Any] = {"generator": f"coder-index {__version__}", "kinds": kinds,
                                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                "clip_model": self.encoder.fingerprint.to_dict(),
                                "analogous_threshold": self.threshold, "synonym_source": self.synonym_source,
                                "prompts": self.prompts,
                                "filter_model": self.filter_encoder.fingerprint.to_dict()}
        if self.llm:
            prov["llm"] = {"model": self.llm.config.model, "base_url": redact_url(self.llm.config.base_url),
                           **self.llm.config.params}
        else:
            prov["llm"] = None
        return prov

    def _from_wordnet(self, classes: list[str], kinds: list[str], filt: AnalogousFilter | None,
                      knowledge: Knowledge, stats: GenerationStats) -> None:
        entries = self._wordnet_texts().entries(classes)
        for c in classes:
            e = entries[c]
            if e.synset is None:
                stats.not_in_wordnet.append(c)
                continue
            if "synonym" in kinds:
                knowledge.set(c, "synonym", e.synonyms, "wordnet")
            if "attribute" in kinds:  # only reached offline: with an LLM attributes come from it
                knowledge.set(c, "attribute", e.attribute, "wordnet")
                knowledge.set(c, "attribute_text", e.attribute_text, "wordnet")
            if "analogous" in kinds and filt is not None:
                kept = filt.keep(c, e.analogous)
                stats.analogous_dropped += len(e.analogous) - len(kept)
                knowledge.set(c, "analogous", filt.rank(c, kept)[: self.max_analogous], "wordnet")

    async def _from_llm(self, classes: list[str], kinds: list[str], filt: AnalogousFilter | None,
                        knowledge: Knowledge, stats: GenerationStats, progress: bool) -> None:
        from tqdm import tqdm

        async def one(c: str, kind: str) -> tuple[str, str, list[str] | None]:
            try:
                if kind == "analogous":
                    find = self._analogous_released if self.released else self._analogous
                    return c, kind, await find(c, filt, stats)  # type: ignore[arg-type]
                answer = await self.llm.complete(self._prompt(kind, c), usable=self._usable(kind))
                if self.released and released.foreign_bullets(answer) and c not in stats.foreign_bullets:
                    stats.foreign_bullets.append(c)
                return c, kind, self._read(answer, kind) if answer else None
            except BudgetExhausted:
                stats.stopped_by_budget = True
                return c, kind, None

        tasks = [asyncio.ensure_future(one(c, k)) for c in classes for k in kinds]
        try:
            with tqdm(total=len(tasks), unit="prompt", desc="generating texts (LLM prompts)",
                      disable=not progress) as bar:
                for fut in asyncio.as_completed(tasks):
                    c, kind, items = await fut
                    if items is not None:
                        knowledge.set(c, kind, items, self.source)
                    else:
                        stats.failed.setdefault(kind, []).append(c)
                    bar.update(1)
        finally:
            await _settle(tasks)
            await self.llm.aclose()  # type: ignore[union-attr]

    async def _analogous(self, c: str, filt: AnalogousFilter, stats: GenerationStats) -> list[str] | None:
        def usable(t: str) -> bool:
            return bool(parse_list(t, names=True))

        answer = await self.llm.complete(analogous_prompt(c), usable=usable)  # type: ignore[union-attr]
        if answer is None:
            return None
        candidates = parse_list(answer, names=True)
        wanted = min(len(candidates), self.max_analogous)
        kept: list[str] = []
        seen: list[str] = []
        for round_no in range(self.max_rounds + 1):
            # CLIP encoding in a worker thread (torch releases the GIL), so the event loop keeps
            # serving the other requests in flight meanwhile.
            fresh = await asyncio.to_thread(filt.keep, c, candidates, kept)
            stats.analogous_dropped += len([x for x in candidates if x not in fresh])
            seen += [x for x in candidates if x.lower() not in {s.lower() for s in seen}]
            kept += fresh[: wanted - len(kept)]
            if len(kept) >= wanted or round_no == self.max_rounds:
                break
            stats.analogous_followups += 1
            answer = await self.llm.complete(  # type: ignore[union-attr]
                analogous_prompt(c, exclude=seen, wanted=wanted - len(kept)), usable=usable)
            if answer is None:
                break
            candidates = parse_list(answer, names=True)
        return kept

    async def _analogous_released(self, c: str, filt: AnalogousFilter, stats: GenerationStats) -> list[str] | None:
        """The released loop: names too close to another class are refused and named in a follow-up
        prompt; once any was refused, it asks 6 follow-ups whatever they bring (the released loop
        never clears its flag). Every round's kept names are added, repeats included."""
        answer = await self.llm.complete(released.analogous_prompt(c),  # type: ignore[union-attr]
                                         usable=self._usable("analogous"))
        if answer is None:
            return None
        if released.foreign_bullets(answer) and c not in stats.foreign_bullets:
            stats.foreign_bullets.append(c)
        spoken = released.spoken(c)
        kept: list[str] = []

        async def judge(answer: str) -> list[str]:
            items = released.raw_items(answer)
            close = await asyncio.to_thread(filt.too_close, spoken, items)
            kept.extend(it for it, bad in zip(items, close, strict=True) if not bad)
            stats.analogous_dropped += int(close.sum())
            return [it for it, bad in zip(items, close, strict=True) if bad]

        refused = await judge(answer)
        if refused:
            asked: Counter[str] = Counter()  # a prompt asked again is a fresh request, as released
            for _ in range(6):
                stats.analogous_followups += 1
                prompt = released.analogous_followup_prompt(c, refused)
                text = prompt[0]["content"]
                answer = await self.llm.complete(  # type: ignore[union-attr]
                    prompt, usable=lambda t: not is_refusal(t), repeat=asked[text])
                asked[text] += 1
                if answer is None:
                    break
                refused = await judge(answer)
        return released.clean(kept)

    # ------------------------------------------------------------------ one-to-one
    def one_to_one(self, pairs: Iterable[tuple[str, str]], progress: bool = False
                   ) -> tuple[dict[tuple[str, str], list[str]], bool]:
        """Features of ``a`` that tell it from ``b`` for each ordered pair, and whether the budget
        stopped the run. One prompt serves both directions: (a, b) and (b, a) share it. The prompt
        names the two classes in alphabetical order; under cvpr24 in the order first given (the
        rerank gives each pair in the class list's order, as a driver walking the released class
        list would), and an answer with one empty side is kept for the other, as released."""
        if self.llm is None:
            raise ValueError("one-to-one texts need an LLM (--llm openai); WordNet cannot describe differences")
        return asyncio.run(self._pairs(list(pairs), progress))

    async def _pairs(self, pairs: list[tuple[str, str]], progress: bool
                     ) -> tuple[dict[tuple[str, str], list[str]], bool]:
        from tqdm import tqdm

        if self.released:  # the first orientation given of each unordered pair
            firsts: dict[frozenset[str], tuple[str, str]] = {}
            for p in pairs:
                if p[0] != p[1]:
                    firsts.setdefault(frozenset(p), p)
            canonical = list(firsts.values())
        else:
            canonical = list(dict.fromkeys(tuple(sorted(p)) for p in pairs if p[0] != p[1]))
        out: dict[tuple[str, str], list[str]] = {}
        stopped = False

        def read(answer: str, a: str, b: str) -> tuple[list[str], list[str]]:
            return released.read_pair(answer) if self.released else parse_pair(answer, a, b)

        def usable(answer: str, a: str, b: str) -> bool:
            if is_refusal(answer):
                return False
            # the released code keeps whatever it read, one side empty included; asked again otherwise
            return self.released or all(read(answer, a, b))

        async def one(a: str, b: str) -> None:
            nonlocal stopped
            prompt = released.one_to_one_prompt(a, b) if self.released else one_to_one_prompt(a, b)
            try:
                answer = await self.llm.complete(  # type: ignore[union-attr]
                    prompt, usable=lambda t: usable(t, a, b))
            except BudgetExhausted:
                stopped = True
                return
            if answer:
                fa, fb = read(answer, a, b)
                out[(a, b)], out[(b, a)] = fa, fb

        tasks = [asyncio.ensure_future(one(a, b)) for a, b in canonical]
        try:
            with tqdm(total=len(tasks), unit="pair", desc="generating one-to-one texts (class pairs)",
                      disable=not progress) as bar:
                for fut in asyncio.as_completed(tasks):
                    await fut
                    bar.update(1)
        finally:
            await _settle(tasks)
            await self.llm.aclose()  # type: ignore[union-attr]
        return {p: out[p] for p in pairs if p in out}, stopped
