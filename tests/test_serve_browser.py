"""The page of `coder-index serve` in a real headless Chromium (Debian's, driven by Playwright):
upload an image, see the bars and texts, browse and filter predictions, open an explanation, read
the report. Screenshots are kept in test-artifacts/ (or $CODER_INDEX_TEST_ARTIFACTS)."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
import httpx  # noqa: E402

from coder_index.serve import ServeConfig, create_app  # noqa: E402
from coder_index.serve.background import BackgroundServer  # noqa: E402

from conftest import shared_path  # noqa: E402
from serve_env import make_serve_env  # noqa: E402

CHROMIUM = os.environ.get("CODER_INDEX_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("CODER_INDEX_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here: apt-get install chromium (.ci/run does)")


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_model):
    env = make_serve_env(tmp_path_factory.mktemp("browser"), tiny_model)
    app = create_app(ServeConfig(index=env["index"], rerank=True, predictions=env["preds_rerank"],
                                 images_root=env["root"], report=env["report"]))
    with BackgroundServer(app) as url:
        yield url, env


@pytest.fixture(scope="module")
def page(site):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        outside: list[str] = []
        pg.on("request", lambda req: outside.append(req.url) if not req.url.startswith((site[0], "blob:", "data:"))
              else None)
        pg.goto(site[0] + "/")
        pg.errors = errors
        yield pg
        assert not errors, errors        # no script error, no failed load, no CSP refusal
        assert not outside, outside      # nothing fetched from anywhere but this server
        browser.close()


def test_upload_shows_bars_texts_and_pairs(page, site):
    url, _ = site
    sample = shared_path("data", "imagenet-samples", "n02106166_Border_collie.JPEG")
    page.set_input_files("#file", str(sample))
    page.wait_for_selector("#bars .bar")
    page.wait_for_selector("#explanation .hit")
    with httpx.Client(base_url=url, timeout=60) as client:
        files = [("files", (sample.name, sample.read_bytes(), "image/jpeg"))]
        row = client.post("/api/classify", files=files).json()[0]
        why = client.post("/api/explain", files=files).json()[0]
    labels = page.locator("#bars .bar").evaluate_all("els => els.map(e => e.dataset.label)")
    assert labels == [t["label"] for t in row["top_k"]]
    assert page.locator("#method").inner_text() == "(coder*)"
    widths = page.locator("#bars .fill").evaluate_all("els => els.map(e => parseFloat(e.style.width))")
    assert widths[0] == pytest.approx(100 * row["top_k"][0]["score"], abs=0.01)
    best = page.locator(".texts-best h3").inner_text()
    runner = page.locator(".texts-runner h3").inner_text()
    assert why["prediction"] in best and why["runner_up"] in runner
    first_text = page.locator(".card").first.locator("tr.hit td").nth(3).inner_text()
    assert first_text == why["nearest_texts"][0]["text"]
    assert page.locator(".pairs tr.pair").count() == sum(p["has_texts"] for p in why["pairs"]["pairs"])
    assert why["pairs"]["prediction"] in page.locator(".pairs h3").inner_text()
    page.screenshot(path=str(ARTIFACTS / "serve-classify.png"), full_page=True)


def test_bad_file_shows_the_servers_message(page, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#classify-error:not([hidden])")
    assert "not an image" in page.locator("#classify-error").inner_text()
    refused = [e for e in page.errors if "status of 400" in e]
    assert refused  # the browser saw the server's 4xx
    page.errors[:] = [e for e in page.errors if e not in refused]
    good = shared_path("data", "imagenet-samples", "n01440764_tench.JPEG")
    page.set_input_files("#file", str(good))
    page.wait_for_selector("#bars .bar")


def test_text_search(page):
    page.fill("#text-query", "a small dog")
    page.click("#text-search button")
    page.wait_for_selector("#text-results tr.hit")
    assert page.locator("#text-results tr.hit").count() == 15


def test_predictions_browser_filters_sorts_and_explains(page, site):
    _, env = site
    page.click("nav button[data-tab=predictions]")
    page.wait_for_selector("#grid .thumb")
    total = len(env["preds_rerank"].read_text().splitlines())
    assert f"{total} image(s) match" == page.locator("#pred-count").inner_text()
    scores = [float(t.split(" · ")[0]) for t in page.locator("#grid .thumb .muted").all_inner_texts()]
    assert scores == sorted(scores)  # the default order: lowest confidence first, for review
    # thumbnails loaded (decoded by the browser) for every card
    page.wait_for_function("() => [...document.querySelectorAll('#grid img')].every(i => i.complete && "
                           "i.naturalWidth > 0)")
    page.screenshot(path=str(ARTIFACTS / "serve-predictions.png"), full_page=True)

    option = page.locator("#f-label option").last  # the rarest label (the list is by count)
    label = option.get_attribute("value")
    count = int(option.inner_text().rsplit("(", 1)[1].rstrip(")"))
    assert 0 < count < total
    page.select_option("#f-label", label)
    page.click("#filters button")
    page.wait_for_function(f"() => document.querySelector('#pred-count').textContent === '{count} image(s) match'")
    assert set(page.locator("#grid .thumb .lab").all_inner_texts()) == {label}

    # a confidence ceiling strictly between two first scores near the median (the server filters
    # on each row's first top-k score), whose count differs from the label filter's and from the total so
    # that waiting for it cannot pass on the previous page
    url, _ = site
    with httpx.Client(base_url=url, timeout=60) as client:
        listed = client.get("/api/predictions", params={"limit": min(total, 500)}).json()
    first = sorted(r["score"] for r in listed["rows"])
    assert len(first) == total
    # (the input's step is 0.01: the browser refuses to submit a value off that grid)
    grid = {i: math.floor(first[i] * 100) / 100 for i in range(1, total)}
    cuts = [i for i in range(1, total) if first[i - 1] < grid[i] < first[i] and i not in (count, total)]
    assert cuts, first
    cut = min(cuts, key=lambda i: abs(i - total // 2))
    ceiling = grid[cut]
    page.select_option("#f-label", "")
    page.fill("#f-max", f"{ceiling:.2f}")
    page.click("#filters button")
    page.wait_for_function(f"() => document.querySelector('#pred-count').textContent === '{cut} image(s) match'")
    texts = page.locator("#grid .thumb .muted").all_inner_texts()
    assert all(float(t.split(" · ")[0]) <= ceiling + 5e-4 for t in texts), (texts, ceiling)  # shown to 3 places
    assert len(texts) == min(cut, 60)

    page.fill("#f-max", "1")
    page.check("#f-changed")
    page.click("#filters button")
    changed = sum(r["changed"] for r in listed["rows"])
    assert 0 < changed < total
    # waited for by the count and by every card, so that the previous page cannot pass for this one
    page.wait_for_function(f"() => document.querySelector('#pred-count').textContent === '{changed} image(s) match'"
                           " && [...document.querySelectorAll('#grid .thumb')].every(t => t.querySelector('.changed'))")
    assert page.locator("#grid .thumb").count() == page.locator("#grid .thumb .changed").count() == min(changed, 60)

    page.locator("#grid .thumb").first.click()
    page.wait_for_selector("#detail[open] .hit")
    assert page.locator("#detail .pairs h3").inner_text().endswith("(changed from stage 1)")
    page.screenshot(path=str(ARTIFACTS / "serve-explain.png"))
    page.click("#detail .close")


def test_report_tab(page, site):
    _, env = site
    page.click("nav button[data-tab=report]")
    page.wait_for_selector("#report .per-class tr")
    page.wait_for_function("() => document.querySelector('img.tsne')?.naturalWidth > 0")
    assert page.locator("#report .per-class").count() >= 1
    page.screenshot(path=str(ARTIFACTS / "serve-report.png"), full_page=True)


def test_api_tab_lists_the_endpoints(page):
    page.click("nav button[data-tab=api]")
    page.wait_for_selector("#api-table code")
    listed = page.locator("#api-table code").all_inner_texts()
    assert "POST /api/classify" in listed and "GET /api/texts" in listed
