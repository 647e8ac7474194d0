"""X-MoRe's released retrieval (``--xmore-retrieval released``, the default of ``--preset cvpr24``) side by
side with the released code's steps, transcribed below from create_cache.py (CaptionCache) and
custom_clip.caption_ensemble: on the same neighbours, the same captions in the same order, the same
caption probabilities. Run over a copied corpus and over one by reference."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import run_cli as run
from images import make_messy_folder

ATOL = 1e-5


def released_caption_probs(model, tokenize, image_feature, neighbour_captions, w, k):
    """The released code's path for one image, step by step. ``neighbour_captions``: what the kNN
    service returns for 200 neighbours, best first (and for 1,000 when fewer than 128 came back)."""
    res = neighbour_captions(200)
    if len(res) < 128:
        res = neighbour_captions(1000)
    cached = res[:128]                                        # CaptionCache: the first 128 captions
    retrieved = list(set(cached))                             # create_cache.py: duplicates removed
    with torch.no_grad():
        tokens = torch.cat([tokenize([txt]) for txt in retrieved])
        text_feature = model.encode_text(tokens)              # raw features, as create_cache.py
    score = torch.matmul(torch.as_tensor(image_feature)[None], text_feature.float().t())
    _, indices = torch.sort(score, descending=True, stable=True)
    ordered = [retrieved[i] for i in indices.squeeze(0).tolist()]
    chosen = ordered[:k]                                      # cap_cache[index][:K]
    with torch.no_grad():                                     # caption_ensemble, ctx_init "a_photo_of_a"
        tokens = torch.cat([tokenize(["a_photo_of_a" + " " + txt]) for txt in chosen])
        features = model.encode_text(tokens).float()
    features = features / features.norm(dim=-1, keepdim=True)
    logits = 100.0 * features @ torch.as_tensor(w, dtype=torch.float32).t()
    return torch.softmax(logits.double(), dim=-1).mean(0).numpy(), chosen


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model, encoder):
    """A corpus of 300 rows whose captions repeat (60 distinct): duplicates among any image's 128."""
    root = tmp_path_factory.mktemp("released")
    (root / "classes.txt").write_text("cat\ndog\nship\ntruck\nbird\nplane\n")
    run("build", root / "idx", "--classes", root / "classes.txt", "--model", tiny_model, "--llm", "none", "-q")
    rng = np.random.default_rng(7)
    laion = root / "laion"
    (laion / "img_emb").mkdir(parents=True)
    (laion / "metadata").mkdir()
    words = ["cat", "dog", "ship", "truck", "bird", "plane"]
    vocabulary = [f"{a} {w} photo number {n}" for a in ("a", "the") for w in words for n in range(5)]
    for s, n in enumerate([170, 130]):
        np.save(laion / "img_emb" / f"img_emb_{s}.npy", rng.standard_normal((n, encoder.embed_dim)).astype(np.float16))
        caps = [vocabulary[i] for i in rng.integers(0, len(vocabulary), n)]
        pq.write_table(pa.table({"caption": caps}), laion / "metadata" / f"metadata_{s}.parquet", row_group_size=50)
    run("corpus", "build", root / "copied", "--embeddings", laion, "--index", root / "idx", "-q")
    run("corpus", "build", root / "ref", "--embeddings", laion, "--reference", "--index", root / "idx", "-q")
    make_messy_folder(root / "images")
    return root


@pytest.mark.parametrize("corpus_name", ["copied", "ref"])
def test_released_retrieval_equals_the_released_steps(env, encoder, corpus_name):
    from coder_index import TextIndex
    from coder_index.methods.xmore.predict import XMore
    from coder_index.stores.corpus import Corpus

    index = TextIndex.open(env / "idx", encoder=encoder)
    corpus = Corpus(env / corpus_name)
    xmore = XMore(index, corpus, k=16, retrieval="released")
    x = np.random.default_rng(1).standard_normal((6, encoder.embed_dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    _, p_cap = xmore.modality_probs(x, "clip")
    model = encoder.model.float().eval()
    for i in range(len(x)):
        def neighbours(n, i=i):
            ids = corpus.search(x[i:i + 1], n)[1][0]
            return corpus.captions(ids[ids >= 0])

        want, chosen = released_caption_probs(model, encoder.tokenize, x[i], neighbours, xmore.w, 16)
        assert len(chosen) == 16 and len(set(chosen)) == 16  # duplicates were there to remove
        np.testing.assert_allclose(p_cap[i], want, atol=ATOL)
    # and it is another rule than the nearest captions as they come
    _, p_near = XMore(index, corpus, k=16).modality_probs(x, "clip")
    assert np.abs(p_near - p_cap).max() > 1e-3


def test_released_retrieval_from_the_command_line_is_recorded_and_resumes(env, tmp_path):
    import json

    out = tmp_path / "r.csv"
    args = ("classify", env / "images", "--index", env / "idx", "--corpus", env / "ref", "--method", "xmore",
            "--xmore-retrieval", "released", "--out", out, "--workers", "0", "-q")
    run(*args)
    record = json.loads(out.with_name("r.csv.run.json").read_text())
    assert record["provenance"]["retrieval"] == "released"
    first = out.read_text()
    run(*args)  # a rerun with the same settings: nothing to do, nothing changed
    assert out.read_text() == first
    res = run("classify", env / "images", "--index", env / "idx", "--corpus", env / "ref", "--method", "xmore",
              "--out", out, "--workers", "0", "-q", code=1)
    assert "--xmore-retrieval" in res.output and "mix" in res.output  # the other rule would mix rows: refused
    res = run("classify", env / "images", "--index", env / "idx", "--xmore-retrieval", "released", "--out",
              tmp_path / "c.csv", code=2)
    assert "--xmore-retrieval applies to" in res.output


class _ShortAnswers:
    """A corpus that, asked for 200 neighbours, gives only 100 to every other image (as a service may),
    and, if ``forgetful``, knows the captions of its last answer only (as a service does)."""

    def __init__(self, corpus, forgetful):
        self.corpus, self.forgetful, self.asked = corpus, forgetful, []
        self.known: set[int] = set()

    def __getattr__(self, name):
        return getattr(self.corpus, name)

    def search(self, x, k):
        sims, ids = self.corpus.search(x, k)
        self.asked.append((len(x), k))
        if k == 200:
            ids, sims = ids.copy(), sims.copy()
            ids[1::2, 100:] = -1
        found = {int(i) for i in ids[ids >= 0]}
        self.known = found if self.forgetful else self.known | found
        return sims, ids

    def captions(self, ids):
        missing = {int(i) for i in np.asarray(ids).ravel()} - self.known
        assert not missing, f"captions asked of rows the last answer did not hold: {sorted(missing)[:5]}"
        return self.corpus.captions(ids)


def test_images_short_of_neighbours_ask_again_and_each_keeps_its_own_answer(env, encoder):
    """The released rule asks again (1,000) for the images that got fewer than 128 neighbours; the
    others keep the first answer's captions, read before the second question (a service knows its
    last answer only): the same probabilities as from a corpus that remembers everything."""
    from coder_index import TextIndex
    from coder_index.methods.xmore.predict import XMore
    from coder_index.stores.corpus import Corpus

    index = TextIndex.open(env / "idx", encoder=encoder)
    x = np.random.default_rng(2).standard_normal((6, encoder.embed_dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    got = {}
    for forgetful in (False, True):
        corpus = _ShortAnswers(Corpus(env / "copied"), forgetful)
        got[forgetful] = XMore(index, corpus, k=16, retrieval="released").modality_probs(x, "clip")[1]
        assert corpus.asked == [(6, 200), (3, 1000)]  # the 3 short ones asked again
    np.testing.assert_allclose(got[True], got[False], atol=ATOL)
