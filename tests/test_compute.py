"""The per-image numeric path on a device (issue 13): one torch code path for the CPU and a GPU.

On the CPU (every machine, CI included) the torch path is checked against float64 references; the
TF32 guard, the FAISS CPU fallback (said once) and the encoder precisions are checked here too.
Tests marked ``cuda`` compare a GPU with the CPU on the same embeddings and run only where CUDA is.
"""

from __future__ import annotations

import logging
import threading

import faiss
import numpy as np
import pytest
import torch
from test_rerank import random_case

from coder_index import CoderClassifier
from coder_index.methods.predict import softmax_top_k, top_k
from coder_index.methods.rerank import rerank
from coder_index.model.compute import exact_float32, precision_switches

cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="needs a CUDA GPU (this machine has none); the CPU tests above cover the same code")
NEAR_TIE = 1e-3  # logits (100 x cosine) closer than this may order differently between devices


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def vocabulary(seed: int, n_classes: int = 40, d: int = 64, n_images: int = 300):
    rng = np.random.default_rng(seed)
    names = rng.integers(1, 3, n_classes)
    extras = rng.integers(0, 6, n_classes)
    cls = np.concatenate([np.repeat(np.arange(n_classes), names), np.repeat(np.arange(n_classes), extras)])
    kinds = np.array(["name"] * names.sum() + ["attribute"] * extras.sum(), dtype=object)
    perm = rng.permutation(len(cls))
    texts = unit(rng.standard_normal((len(cls), d)))
    images = unit(rng.standard_normal((n_images, d)))
    return images, texts, cls[perm], kinds[perm], n_classes


def logits_float64(images, texts, cls, kinds, n_classes) -> np.ndarray:
    """METHODS.md Eq. 7-8 in float64, one class at a time."""
    s = unit(images.astype(np.float64)) @ unit(texts.astype(np.float64)).T
    out = np.empty((len(images), n_classes))
    for c in range(n_classes):
        name = (cls == c) & np.isin(kinds, ["name", "synonym"])
        extra = (cls == c) & ~np.isin(kinds, ["name", "synonym"])
        out[:, c] = 100 * (s[:, name].max(axis=1) + s[:, extra].sum(axis=1)) / (extra.sum() + 1)
    return out


def assert_same_predictions_but_near_ties(got: np.ndarray, want: np.ndarray) -> None:
    top_want = np.sort(want, axis=1)[:, -2:]
    clear = (top_want[:, 1] - top_want[:, 0]) > NEAR_TIE
    assert clear.mean() > 0.9  # the comparison has teeth: most rows are not near-ties
    np.testing.assert_array_equal(got.argmax(axis=1)[clear], want.argmax(axis=1)[clear])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cpu_torch_path_equals_float64(seed):
    images, texts, cls, kinds, c = vocabulary(seed)
    want = logits_float64(images, texts, cls, kinds, c)
    for kw in ({}, {"image_rows": 7, "chunk_bytes": 4 * 7 * 13}):  # one pass; passes of 7 images, 13 texts
        clf = CoderClassifier(texts, cls, kinds, c, device="cpu", **kw)
        on_dev = clf.logits_on_device(images)
        assert isinstance(on_dev, torch.Tensor) and on_dev.device.type == "cpu"
        np.testing.assert_allclose(on_dev.numpy(), want, atol=2e-4)
        assert_same_predictions_but_near_ties(clf.logits(images), want)


def lowered() -> list[tuple[object, str, object]]:
    """Allow reduced precision on every switch, as a user's own code may; returns what to put back."""
    saved = []
    for obj, attr in precision_switches():
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, "tf32" if attr == "fp32_precision" else True)
    return saved


def values() -> list[object]:
    return [getattr(obj, attr) for obj, attr in precision_switches()]


def exact() -> list[object]:
    return ["ieee" if attr == "fp32_precision" else False for _, attr in precision_switches()]


def test_exact_float32_turns_tf32_off_and_restores_the_callers_settings():
    assert precision_switches()  # this torch has switches to guard
    saved = lowered()
    try:
        before = values()
        assert before != exact()
        with exact_float32():
            assert values() == exact()
            with exact_float32():  # nested
                pass
            assert values() == exact()
        assert values() == before
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)


def test_exact_float32_holds_while_any_thread_is_inside():
    saved = lowered()
    before = values()
    inside, release, seen = threading.Barrier(9), threading.Event(), []

    def worker(i: int) -> None:
        with exact_float32():
            inside.wait()
            if i % 2:  # half leave early; the switches must stay exact for the others
                return
            release.wait()
            seen.append(values() == exact())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        inside.wait()
        for t in threads[1::2]:
            t.join()
        release.set()
        for t in threads:
            t.join()
        assert seen == [True] * 4
        assert values() == before  # the caller's settings are back
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)


def test_top_k_and_probabilities_from_tensors_equal_arrays():
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((50, 30)) * 20).astype(np.float32)
    logits[:, 9] = logits[:, 4]  # ties
    for k in (1, 3, 30):
        a_ids, a_p = softmax_top_k(logits, k)
        t_ids, t_p = softmax_top_k(torch.from_numpy(logits), k)
        np.testing.assert_array_equal(a_ids, t_ids)
        np.testing.assert_array_equal(a_p, t_p)
        np.testing.assert_array_equal(top_k(torch.from_numpy(logits), k)[0], top_k(logits, k)[0])


def test_faiss_without_gpu_falls_back_and_says_so_once(monkeypatch, caplog):
    from coder_index.model import faiss_gpu

    monkeypatch.setattr(faiss_gpu, "_said", set())
    if faiss_gpu.gpu_support() is None:
        pytest.skip("this FAISS has GPU support and sees a GPU: there is no fallback to test")
    rng = np.random.default_rng(0)
    vectors = unit(rng.standard_normal((500, 32))).astype(np.float32)
    q = unit(rng.standard_normal((20, 32))).astype(np.float32)
    cuda0 = torch.device("cuda", 0)
    with caplog.at_level(logging.WARNING, logger="coder_index.model.faiss_gpu"):
        for _ in range(3):
            sims, pos = faiss_gpu.knn(q, vectors, 5, cuda0)
            index = faiss.IndexFlatIP(32)
            assert faiss_gpu.index_for_device(index, cuda0) is index
    want_sims, want_pos = faiss.knn(q, vectors, 5, metric=faiss.METRIC_INNER_PRODUCT)
    np.testing.assert_array_equal(pos, want_pos)
    np.testing.assert_array_equal(sims, want_sims)
    said = [r for r in caplog.records if "on the CPU" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
    assert "faiss" in said[0].getMessage().lower()
    # the CPU device never asks for a GPU and says nothing
    caplog.clear()
    faiss_gpu.knn(q, vectors, 5, torch.device("cpu"))
    assert not caplog.records


def test_encoder_precision_choices(tiny_model):
    from coder_index import ClipEncoder

    enc = ClipEncoder(tiny_model, device="cpu", precision="auto")
    assert (enc.precision, enc.dtype) == ("fp32", torch.float32)
    for bad, match in (("bf16", "for GPUs"), ("fp8", "must be one of")):
        with pytest.raises(ValueError, match=match):
            ClipEncoder(tiny_model, device="cpu", precision=bad)


def test_classify_precision_on_the_cpu_is_a_usage_error(tmp_path, built_index):
    from click.testing import CliRunner

    from coder_index_cli.main import cli

    images = tmp_path / "imgs"
    images.mkdir()
    r = CliRunner().invoke(cli, ["classify", str(images), "--index", str(built_index.path), "--out",
                                 str(tmp_path / "o.csv"), "--precision", "bf16", "--device", "cpu"])
    assert r.exit_code == 2, r.output
    assert "--precision bf16 is for GPUs" in r.output
    assert not (tmp_path / "o.csv").exists()


# ---------------------------------------------------------------------------------- CUDA only
@cuda
@pytest.mark.parametrize("seed", [0, 1])
def test_gpu_classifier_equals_cpu_and_float64(seed):
    images, texts, cls, kinds, c = vocabulary(seed, n_classes=200, n_images=2000)
    want = logits_float64(images, texts, cls, kinds, c)
    cpu = CoderClassifier(texts, cls, kinds, c, device="cpu").logits(images)
    gpu_clf = CoderClassifier(texts, cls, kinds, c, device="cuda")
    on_gpu = gpu_clf.logits_on_device(images)
    assert on_gpu.device.type == "cuda"
    gpu = on_gpu.cpu().numpy()
    np.testing.assert_allclose(gpu, cpu, atol=2e-4)  # float32 products: TF32 would miss this by far
    np.testing.assert_allclose(gpu, want, atol=2e-4)
    assert_same_predictions_but_near_ties(gpu, want)
    ids_gpu, p_gpu = softmax_top_k(on_gpu, 5)
    ids_cpu, p_cpu = softmax_top_k(cpu, 5)
    agree = (ids_gpu[:, 0] == ids_cpu[:, 0]).mean()
    assert agree > 0.99
    np.testing.assert_allclose(p_gpu[ids_gpu[:, 0] == ids_cpu[:, 0], 0], p_cpu[ids_gpu[:, 0] == ids_cpu[:, 0], 0],
                               rtol=1e-3)


@cuda
def test_gpu_rerank_equals_cpu():
    x, logits, pair_texts = random_case(3, n=2000, c=30, d=32)
    cpu = rerank(x, logits, pair_texts, gap_threshold=0.5)
    gpu = rerank(x, torch.from_numpy(logits).cuda(), pair_texts, gap_threshold=0.5)
    assert (cpu == gpu).mean() > 0.999
