"""Few-shot CODER-Adapter and Tip-Adapter: formulas, search, persistence, the whole flow."""

import inspect
import json

import numpy as np
import pytest
from click.testing import CliRunner

from coder_index import CoderAdapter, TextIndex, TipAdapter
from coder_index.methods.fewshot.adapter import SEARCHES, CacheLogits, SearchGrid, count_correct, search_hyperparameters
from coder_index.methods.fewshot.model import FewShotModel
from coder_index_cli.main import cli


def direct_coder_adapter(support, labels, n_classes, test, zs, alpha, beta, T):  # noqa: N803
    s_keys = support / np.linalg.norm(support, axis=1, keepdims=True)
    s = test / np.linalg.norm(test, axis=1, keepdims=True)
    a = s @ s_keys.T
    out = np.zeros_like(zs)
    for n in range(len(test)):
        row = (a[n] - a[n].min()) / (a[n].max() - a[n].min()) / T
        weights = np.exp(-beta * (1 - row))
        for m, y in enumerate(labels):
            out[n, y] += weights[m]
    return zs + alpha * out


def test_coder_adapter_formula():
    rng = np.random.default_rng(0)
    support, test = rng.random((30, 12)), rng.random((7, 12))
    labels, zs = rng.integers(0, 4, 30), rng.standard_normal((7, 4))
    got = CoderAdapter(2.5, 5.0, T=0.7).fit(support, labels, 4).logits(test, zs)
    np.testing.assert_allclose(got, direct_coder_adapter(support, labels, 4, test, zs, 2.5, 5.0, 0.7), rtol=1e-4)


def test_tip_adapter_formula_has_no_minmax():
    rng = np.random.default_rng(1)
    keys, x = rng.standard_normal((20, 8)), rng.standard_normal((5, 8))
    labels, zs = rng.integers(0, 3, 20), rng.standard_normal((5, 3))
    k = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    a = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ k.T
    expected = zs + 1.5 * np.exp(-3.0 * (1 - a)) @ np.eye(3)[labels]
    np.testing.assert_allclose(TipAdapter(1.5, 3.0).fit(keys, labels, 3).logits(x, zs), expected, rtol=1e-5)


def test_bad_input():
    with pytest.raises(ValueError, match="not fitted"):
        CoderAdapter(1, 1).logits(np.ones((1, 2)), np.ones((1, 2)))
    with pytest.raises(ValueError, match="beta"):
        CoderAdapter(1, 0)
    ad = CoderAdapter(1, 1).fit(np.eye(3), [0, 1, 1], 2)
    with pytest.raises(ValueError, match="columns"):
        ad.logits(np.ones((1, 4)), np.ones((1, 2)))
    with pytest.raises(ValueError, match="zs_logits"):
        ad.logits(np.ones((1, 3)), np.ones((1, 3)))


def released_loop(a, values, zs, y, grid):
    """The released search written plainly: every (beta, alpha) of each round, strictly-greater keeps the
    first best, each round restarts from 0 and narrows to [0.5x, 1.5x) of its best."""
    blo, bhi = grid.beta_range
    alo, ahi = grid.alpha_range
    for _ in range(grid.rounds):
        best, bb, ba = 0, 0.0, 0.0
        for i in range(grid.beta_steps):
            beta = i * (bhi - blo) / grid.beta_steps + blo
            cache = np.exp(-beta * (1 - a)) @ values
            for j in range(grid.alpha_steps):
                alpha = j * (ahi - alo) / grid.alpha_steps + alo
                acc = int(((zs + alpha * cache).argmax(1) == y).sum())
                if acc > best:
                    best, bb, ba = acc, beta, alpha
        blo, bhi, alo, ahi = bb * 0.5, bb * 1.5, ba * 0.5, ba * 1.5
    return bb, ba, best


def _case(seed, n=60, classes=6, shots=4, k=24, noise=2.0):
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((classes, k))
    labels = rng.permutation(np.repeat(np.arange(classes), shots))
    support = protos[labels] + noise * rng.standard_normal((len(labels), k))
    y = rng.integers(0, classes, n)
    val = protos[y] + noise * rng.standard_normal((n, k))
    zs = rng.standard_normal((n, classes)) * 2
    zs[np.arange(n), y] += 1.0
    return CoderAdapter(1, 1).fit(support, labels, classes), val, y, zs


@pytest.mark.parametrize("seed", range(5))
def test_search_picks_what_the_released_loop_picks(seed):
    ad, val, y, zs = _case(seed)
    grid = SearchGrid(beta_steps=40, alpha_steps=12)
    expected = released_loop(ad.affinity(val), ad.values_.astype(np.float64), zs, y, grid)
    result = search_hyperparameters(ad, val, y, zs, search=grid)
    assert (result["beta"], result["alpha"], round(result["val_accuracy"] * len(y))) == expected
    assert (ad.alpha, ad.beta) == (result["alpha"], result["beta"])


def test_full_released_grid_and_ties_keep_the_first_point():
    ad, val, y, zs = _case(7, n=30)
    expected = released_loop(ad.affinity(val), ad.values_.astype(np.float64), zs, y, SEARCHES["released"])
    assert search_hyperparameters(ad, val, y, zs)["beta"] == expected[0]
    # every point is right on every image: each round keeps its first point, as the released loop does
    easy = zs.copy()
    easy[np.arange(len(y)), y] += 1000
    expected = released_loop(ad.affinity(val), ad.values_.astype(np.float64), easy, y, SEARCHES["fast"])
    got = search_hyperparameters(ad, val, y, easy, search="fast")
    assert (got["beta"], got["alpha"]) == expected[:2] == (0.1 * 0.5 * 0.5, 0.1 * 0.5 * 0.5)


def test_unequal_shots_and_exact_ties_between_classes():
    """A class with fewer shots (the one-hot product path) and zero-shot logits with exact ties,
    decided as argmax decides them (first index)."""
    ad, val, y, zs = _case(3, shots=3)
    rng = np.random.default_rng(0)
    support = np.concatenate([ad.keys_, rng.standard_normal((1, ad.keys_.shape[1]))])
    labels = np.concatenate([ad.values_.argmax(1), [2]])
    ad = CoderAdapter(1, 1).fit(support, labels, 6)
    zs = np.round(zs)  # many exact ties
    grid = SearchGrid(beta_steps=30, alpha_steps=10)
    expected = released_loop(ad.affinity(val), ad.values_.astype(np.float64), zs, y, grid)
    got = search_hyperparameters(ad, val, y, zs, search=grid)
    assert (got["beta"], got["alpha"], round(got["val_accuracy"] * len(y))) == expected


def test_count_correct_equals_direct_evaluation_at_every_alpha():
    import torch

    ad, val, y, zs = _case(11, n=200)
    cache = CacheLogits(ad.affinity(val), ad.values_.argmax(1), 6)
    zs_t, y_t = torch.from_numpy(zs), torch.from_numpy(y)
    alphas = np.concatenate([np.linspace(0.01, 30, 300), [0.0]])
    for beta in (0.1, 3.0, 50.0, 199.9):
        k = cache(beta)
        got = count_correct(zs_t, k, y_t, alphas)
        direct = [int(((zs_t + a * k).argmax(1) == y_t).sum()) for a in alphas]
        assert got.tolist() == direct


def test_search_takes_only_validation_data():
    params = list(inspect.signature(search_hyperparameters).parameters)
    assert params[:4] == ["adapter", "val_features", "val_labels", "val_zs_logits"]
    assert not any("test" in p for p in params)


@pytest.fixture
def fewshot_env(tmp_path, tiny_model):
    from images import make_colour_classes

    classes = ["red", "green", "blue"]
    (tmp_path / "classes.txt").write_text("\n".join(classes) + "\n")
    res = CliRunner().invoke(cli, ["build", str(tmp_path / "idx"), "--classes", str(tmp_path / "classes.txt"),
                                   "--model", tiny_model])
    assert res.exit_code == 0, res.output
    make_colour_classes(tmp_path, classes, {"train": 10, "test": 4}, tint=200, noise=80, seed=0)
    return tmp_path


def fit(env, out, *extra):
    args = ["fewshot", "fit", str(env / "train"), "--index", str(env / "idx"), "--shots", "4", "--out",
            str(env / out), "--augment-epochs", "2", "--workers", "0", "--json", *extra]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_fit_never_reads_test_images(fewshot_env, monkeypatch):
    from coder_index.pipeline.sources.base import Sample

    seen = []
    real = Sample.open  # every image of fewshot fit, support and validation, is opened by the one feed
    monkeypatch.setattr(Sample, "open", lambda self: (seen.append(str(self.path or self.row)), real(self))[1])
    manifest = fit(fewshot_env, "ad")
    assert seen and not any("/test/" in p for p in seen)
    assert manifest["validation"]["images"] == 3 * 6  # the 6 non-support images of each class


def test_round_trip_determinism_and_prediction(fewshot_env):
    m1 = fit(fewshot_env, "a1", "--seed", "3")
    m2 = fit(fewshot_env, "a2", "--seed", "3")
    fit(fewshot_env, "a3", "--seed", "4")
    index = TextIndex.open(fewshot_env / "idx")
    f1, f2, f3 = (FewShotModel(fewshot_env / a, index) for a in ("a1", "a2", "a3"))
    assert m1["adapters"] == m2["adapters"] and m1["shots"] == 4 and m1["seed"] == 3
    np.testing.assert_array_equal(f1.labels, f2.labels)
    np.testing.assert_allclose(f1.support_images, f2.support_images, atol=1e-6)
    assert not np.allclose(f1.support_images, f3.support_images)

    from coder_index.core.decode import load_image

    x = index.encoder.encode_images([load_image(p) for p in sorted((fewshot_env / "test").rglob("*.png"))])
    h = m1["adapters"]["coder-adapter"]
    zs = f1.zero_shot(x)
    expected = f1.coder_adapter().logits(x @ f1.text_emb.T, zs)
    assert (h["alpha"], h["beta"]) == (f1.coder_adapter().alpha, f1.coder_adapter().beta)
    np.testing.assert_allclose(f1.logits(x), expected, rtol=1e-4, atol=1e-4)
    exact_via_topk = FewShotModel(fewshot_env / "a1", index, top_k=f1.support.ntotal).logits(x)
    np.testing.assert_allclose(exact_via_topk, expected, rtol=1e-4, atol=1e-4)


def test_fewer_images_than_shots(fewshot_env):
    args = ["fewshot", "fit", str(fewshot_env / "train"), "--index", str(fewshot_env / "idx"), "--shots", "12",
            "--out", str(fewshot_env / "x"), "--augment-epochs", "0", "--workers", "0"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and "fewer than 12 images" in res.output and "--allow-fewer" in res.output
    res = CliRunner().invoke(cli, args + ["--allow-fewer", "--val", str(fewshot_env / "test")])
    assert res.exit_code == 0, res.output


def test_classify_and_eval_with_adapter(fewshot_env, other_tiny_model):
    fit(fewshot_env, "ad")
    runner = CliRunner()
    res = runner.invoke(cli, ["classify", str(fewshot_env / "test"), "--index", str(fewshot_env / "idx"), "--out",
                              str(fewshot_env / "p.csv"), "--adapter", str(fewshot_env / "ad"), "--workers", "0"])
    assert res.exit_code == 0, res.output
    rows = (fewshot_env / "p.csv").read_text().splitlines()
    assert len(rows) == 13 and all(',"coder-adapter",' in r for r in rows[1:])
    res = runner.invoke(cli, ["eval", str(fewshot_env / "test"), "--index", str(fewshot_env / "idx"), "--adapter",
                              str(fewshot_env / "ad"), "--out", str(fewshot_env / "rep"), "--tsne-samples", "0",
                              "--workers", "0", "-q"])
    assert res.exit_code == 0, res.output
    rep = json.loads((fewshot_env / "rep" / "report.json").read_text())
    assert [m["name"] for m in rep["methods"]] == ["clip", "tip-adapter", "coder-adapter"]
    # an adapter refuses an index built with another model
    runner.invoke(cli, ["build", str(fewshot_env / "idx2"), "--classes", str(fewshot_env / "classes.txt"),
                        "--model", other_tiny_model])
    res = runner.invoke(cli, ["classify", str(fewshot_env / "test"), "--index", str(fewshot_env / "idx2"), "--out",
                              str(fewshot_env / "q.csv"), "--adapter", str(fewshot_env / "ad")])
    assert res.exit_code == 1 and "fit a new adapter" in res.output


def test_support_embedding_is_the_normalised_mean_of_raw_views(fewshot_env):
    """As the released build_cache: mean over augment epochs of the raw features, then normalise."""
    import torch

    from coder_index.core.decode import load_image
    from coder_index.pipeline.support_views import augmentation, augmented_embeddings

    index = TextIndex.open(fewshot_env / "idx")
    enc = index.encoder
    paths = sorted((fewshot_env / "train" / "red").glob("*.png"))[:3]
    support = augmented_embeddings(enc, paths, 4, seed=5, workers=0, also_first=(1, 3, 4, 9))
    got, errors = support.keys, support.errors
    # the released way, whole: the augmentation with its ToTensor + Normalize on each Pillow image, seeded
    # per (seed, image, view); the feed splits it (uint8 views, normalised where the encoder runs)
    views = []
    for i, p in enumerate(paths):
        for e in range(4):
            torch.manual_seed(5 * 1_000_003 + i * 1_009 + e)
            views.append(augmentation(enc)(load_image(p)))
    raw = enc.encode_image_batch(torch.stack(views), normalize=False).reshape(3, 4, -1)   # [3, 4, D]
    expected = raw.mean(1) / np.linalg.norm(raw.mean(1), axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    normalised_first = (raw / np.linalg.norm(raw, axis=2, keepdims=True)).mean(1)
    normalised_first /= np.linalg.norm(normalised_first, axis=1, keepdims=True)
    assert np.abs(got - normalised_first).max() > 2e-5  # the two orders really differ here (atol above: 1e-6)
    assert not errors and not np.allclose(raw[:, 0], raw[:, 1])  # the views really differ
    # the means of the first n views (the Tip-Adapter baseline's fewer views), from the same encoding
    assert sorted(support.first) == [1, 3]  # 4 is all of them, 9 more than there are
    for n in (1, 3):
        head = raw[:, :n].mean(1)
        np.testing.assert_allclose(support.first[n], head / np.linalg.norm(head, axis=1, keepdims=True), atol=1e-6)


def test_released_defaults_per_dataset(fewshot_env):
    from coder_index.core.presets import few_shot_defaults

    assert few_shot_defaults("oxford_pets") == {"augment_epochs": 10, "init_alpha": 1.0, "init_beta": 26.0,
                                                 "released": "oxford-pet"}
    assert few_shot_defaults("ImageNet")["augment_epochs"] == 1
    assert few_shot_defaults("dtd")["init_beta"] == 30.18
    assert few_shot_defaults(None)["augment_epochs"] == 20 and few_shot_defaults("cifar10")["augment_epochs"] == 20
    args = ["fewshot", "fit", str(fewshot_env / "train"), "--index", str(fewshot_env / "idx"), "--shots", "2",
            "--out", str(fewshot_env / "ad"), "--workers", "0", "--json", "--search", "fast"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    assert m["augment_epochs"] == 20 and m["search"]["grid"] == "fast"
    init = m["adapters"]["coder-adapter"]["init"]
    assert (init["alpha"], init["beta"]) == (1.0, 1.0) and 0 <= init["val_accuracy"] <= 1
    assert m["zero_shot_prompts"].startswith("clip:imagenet")


def test_cvpr24_tip_adapter_is_searched_on_tip_adapters_own_grid():
    from coder_index.core.presets import TextRecipe
    from coder_index.pipeline.fit_adapter import tip_adapter_search

    recipe = TextRecipe.make("cvpr24", "caltech-101", "few-shot")
    grid, init, source = tip_adapter_search(recipe, "released", (100.0, 24.76))
    # gaopengcuhk/Tip-Adapter configs/caltech101.yaml: search_scale [12, 5], search_step [200, 20], init 1 / 3
    assert (grid.beta_range, grid.alpha_range, grid.beta_steps, grid.alpha_steps, grid.rounds) == \
        ((0.1, 12.0), (0.1, 5.0), 200, 20, 1)
    assert init == (3.0, 1.0) and source == "Tip-Adapter configs/caltech101.yaml"
    for seed in range(3):
        _, val, y, zs = _case(seed, n=40)
        rng = np.random.default_rng(seed + 100)
        keys = rng.standard_normal((24, val.shape[1]))
        labels = np.repeat(np.arange(6), 4)
        tip = TipAdapter(*init).fit(keys, labels, 6)
        expected = released_loop(tip.affinity(val), tip.values_.astype(np.float64), zs, y, grid)
        got = search_hyperparameters(tip, val, y, zs, search=grid, init=init)
        assert (got["beta"], got["alpha"], round(got["val_accuracy"] * len(y))) == expected
    # the default preset, and --search fast, keep CODER-Adapter's grid
    assert tip_adapter_search(TextRecipe.make("default", "caltech101"), "released", (1.0, 2.0)) == \
        ("released", (1.0, 2.0), "released (CODER-Adapter's grid)")
    assert tip_adapter_search(recipe, "fast", (1.0, 2.0))[0] == "fast"


def test_fit_reports_the_chosen_tip_adapter_point(fewshot_env, tiny_model):
    (fewshot_env / "c.txt").write_text("red\ngreen\nblue\n")
    res = CliRunner().invoke(cli, ["build", str(fewshot_env / "cv"), "--classes", str(fewshot_env / "c.txt"),
                                   "--model", tiny_model, "--preset", "cvpr24", "--dataset", "caltech-101",
                                   "--task", "few-shot"])
    assert res.exit_code == 0, res.output
    base = ["fewshot", "fit", str(fewshot_env / "train"), "--index", str(fewshot_env / "cv"), "--shots", "4",
            "--augment-epochs", "1", "--workers", "0"]
    res = CliRunner().invoke(cli, [*base, "--out", str(fewshot_env / "t1"), "--method", "tip"])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stdout.splitlines() if "alpha=" in ln]
    assert len(lines) == 1 and lines[0].startswith("tip-adapter: alpha=")
    assert "grid: Tip-Adapter configs/caltech101.yaml" in lines[0]
    m = json.loads((fewshot_env / "t1" / "manifest.json").read_text())
    tip = m["adapters"]["tip-adapter"]
    assert f"alpha={tip['alpha']:.4g} beta={tip['beta']:.4g}" in lines[0]
    assert (tip["init"]["alpha"], tip["init"]["beta"]) == (3.0, 1.0)
    assert m["search"]["tip-adapter"][0]["betas"][2] == 200 and len(m["search"]["tip-adapter"]) == 1


def test_cvpr24_tip_adapter_keys_average_tip_adapters_own_views(fewshot_env, tiny_model):
    """Under cvpr24 the Tip-Adapter baseline's keys average Tip-Adapter's augment_epoch (10, its
    configs) while CODER-Adapter keeps the CODER config's 20; --augment-epochs sets both."""
    import sqlite3

    from coder_index.pipeline.support_views import augmented_embeddings

    (fewshot_env / "c.txt").write_text("red\ngreen\nblue\n")
    idx = fewshot_env / "cv-views"
    res = CliRunner().invoke(cli, ["build", str(idx), "--classes", str(fewshot_env / "c.txt"), "--model", tiny_model,
                                   "--preset", "cvpr24", "--dataset", "caltech-101", "--task", "few-shot"])
    assert res.exit_code == 0, res.output
    base = ["fewshot", "fit", str(fewshot_env / "train"), "--index", str(idx), "--shots", "2", "--workers", "0",
            "--search", "fast"]
    res = CliRunner().invoke(cli, [*base, "--out", str(fewshot_env / "v20")])
    assert res.exit_code == 0, res.output
    m = json.loads((fewshot_env / "v20" / "manifest.json").read_text())
    assert (m["augment_epochs"], m["tip_adapter_augment_epochs"]) == (20, 10)
    with sqlite3.connect(fewshot_env / "v20" / "meta.sqlite") as conn:
        paths = [p for (p,) in conn.execute("select path from support order by id")]
    keys = np.load(fewshot_env / "v20" / "support_images.npy")
    enc = TextIndex.open(idx).encoder
    ten = augmented_embeddings(enc, paths, 10, seed=1, workers=0).keys
    twenty = augmented_embeddings(enc, paths, 20, seed=1, workers=0).keys
    np.testing.assert_allclose(keys, ten, atol=1e-5)
    assert np.abs(keys - twenty).max() > 1e-4  # not CODER-Adapter's 20 views
    res = CliRunner().invoke(cli, [*base, "--out", str(fewshot_env / "v3"), "--augment-epochs", "3"])
    assert res.exit_code == 0, res.output
    m = json.loads((fewshot_env / "v3" / "manifest.json").read_text())
    assert (m["augment_epochs"], m["tip_adapter_augment_epochs"]) == (3, 3)
