"""The Auto Text Generator against a real OpenAI-compatible HTTP server on 127.0.0.1 (the real
`openai` client over a socket), including the server misbehaving on purpose."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from coder_index.textgen.generator import AnalogousFilter, AutoTextGenerator
from coder_index.textgen.llm import LLMCache, LLMClient, LLMConfig, LLMError
from coder_index.textgen.prompts import attribute_prompt

from llm_server import FakeLLMServer

KEY = "sk-test-SECRET-7f3a9c2e51d04b8e"


@pytest.fixture
def server():
    with FakeLLMServer() as s:
        yield s


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def make_gen(encoder, wordnet_texts, server, cache, *, synonym_source="wordnet", threshold=0.999, **cfg):
    # threshold 0.999: the tiny random CLIP puts all prompts within ~0.9 of each other, so the paper's
    # 0.9 would drop every name; only names equal to a class (cosine 1) are what these tests filter.
    cfg = {"backoff_base": 0.01, "timeout": 5.0, **cfg}
    llm = LLMClient(LLMConfig(model="fake-model", base_url=server.base_url, **cfg), LLMCache(cache))
    return AutoTextGenerator(encoder, llm, synonym_source=synonym_source, analogous_threshold=threshold,
                             wordnet=wordnet_texts)


def test_lists_per_kind(encoder, wordnet_texts, server, tmp_path):
    server.overrides[("attribute", "cat")] = ("Sure! Here are some features:\n1. **pointed ears**\n2. whiskers.\n"
                                              "3. whiskers\n\nHope this helps!")
    server.overrides[("analogous", "cat")] = '["lynx", "ocelot"]'
    server.overrides[("synonym", "cat")] = "true cat, domestic cat"
    gen = make_gen(encoder, wordnet_texts, server, tmp_path / "c.sqlite", synonym_source="llm")
    k, stats = gen.generate(["cat", "dog"])
    assert k.get("cat", "attribute") == ["pointed ears", "whiskers"]
    assert k.get("cat", "analogous") == ["lynx", "ocelot"]
    assert k.get("cat", "synonym") == ["true cat", "domestic cat"]
    assert k.get("dog", "attribute") == ["dog shape", "dog colour", "dog texture"]
    assert k.classes["cat"]["source"]["attribute"] == "llm:fake-model"
    assert stats.with_kind == {"attribute": 2, "analogous": 2, "synonym": 2}
    assert server.by_kind["attribute"] == 2 and server.by_kind["synonym"] == 2


def test_analogous_filter_drops_a_class_name_and_asks_again(encoder, wordnet_texts, server, tmp_path):
    server.overrides[("analogous", "cat")] = "- Dog\n- lynx\n- tiger"
    server.overrides[("analogous_more", "cat")] = "- lynx\n- cheetah"
    gen = make_gen(encoder, wordnet_texts, server, tmp_path / "c.sqlite")
    k, stats = gen.generate(["cat", "dog"], ["analogous"])
    assert k.get("cat", "analogous") == ["lynx", "tiger", "cheetah"]
    assert server.by_kind["analogous_more"] == 1
    follow_up = [p for p in server.prompts if "Do not list" in p]
    assert len(follow_up) == 1 and "Dog, lynx, tiger" in follow_up[0] and "Give 1 other" in follow_up[0]
    assert stats.analogous_dropped >= 1


def test_analogous_follow_ups_are_bounded(encoder, wordnet_texts, server, tmp_path):
    server.overrides[("analogous", "cat")] = "- dog\n- lynx"
    server.overrides[("analogous_more", "cat")] = "- dog"  # never a usable replacement
    gen = make_gen(encoder, wordnet_texts, server, tmp_path / "c.sqlite")
    gen.max_rounds = 3
    k, _ = gen.generate(["cat", "dog"], ["analogous"])
    assert k.get("cat", "analogous") == ["lynx"]
    assert server.by_kind["analogous_more"] == 1  # the same follow-up prompt is answered from cache after


def test_filter_threshold_matches_direct_computation(encoder):
    classes = ["cat", "dog", "fox", "car"]
    filt = AnalogousFilter(encoder, classes, threshold=0.9)
    cands = ["lynx", "wolf", "truck", "coyote", "DOG", "cat"]
    kept = filt.keep("cat", cands)
    emb = encoder.encode_texts([f"a photo of {c}" for c in cands[:4]])
    ref = encoder.encode_texts([f"a photo of {c}" for c in classes[1:]])  # the *other* classes
    expected = [c for c, s in zip(cands[:4], (emb @ ref.T).max(1), strict=True) if s <= 0.9]
    assert kept == expected  # class names themselves ("DOG", "cat") never survive


def test_rerun_and_shared_classes_send_no_request(encoder, wordnet_texts, server, tmp_path):
    cache = tmp_path / "c.sqlite"
    k1, _ = make_gen(encoder, wordnet_texts, server, cache).generate(["cat", "dog"], ["attribute", "analogous"])
    sent = server.requests
    k2, s2 = make_gen(encoder, wordnet_texts, server, cache).generate(["cat", "dog"], ["attribute", "analogous"])
    assert server.requests == sent
    assert k2.classes == k1.classes
    assert "0 request(s) sent" in s2.llm_summary
    make_gen(encoder, wordnet_texts, server, cache).generate(["dog", "fox"], ["attribute"])
    assert server.requests == sent + 1  # only fox's attribute prompt is new


def test_retries_on_429_500_and_timeouts(encoder, wordnet_texts, server, tmp_path):
    server.faults = ["429", "500", "timeout"]
    server.retry_after = "0.4"
    server.timeout_sleep = 1.5
    gen = make_gen(encoder, wordnet_texts, server, tmp_path / "c.sqlite", timeout=0.5)
    t0 = time.perf_counter()
    k, _ = gen.generate(["cat"], ["attribute"])
    assert time.perf_counter() - t0 >= 0.4  # retry-after honoured
    assert k.get("cat", "attribute") == ["cat shape", "cat colour", "cat texture"]
    assert gen.llm.usage.retries == 3 and gen.llm.usage.requests == 4 and server.requests == 4


@pytest.mark.parametrize("fault", ["empty", "garbage", "refusal"])
def test_unusable_answers_are_not_cached(encoder, wordnet_texts, server, tmp_path, fault):
    server.faults = [fault, fault]
    cache = tmp_path / "c.sqlite"
    k, stats = make_gen(encoder, wordnet_texts, server, cache).generate(["cat"], ["attribute"])
    assert k.get("cat", "attribute") == [] and stats.missing["attribute"] == ["cat"]
    assert server.requests == 2  # one retry of a bad answer, then give up
    k, _ = make_gen(encoder, wordnet_texts, server, cache).generate(["cat"], ["attribute"])
    assert k.get("cat", "attribute") == ["cat shape", "cat colour", "cat texture"]


def test_budget_stops_cleanly_and_keeps_what_was_fetched(encoder, wordnet_texts, server, tmp_path):
    classes = ["cat", "dog", "fox", "owl", "eel"]
    cache = tmp_path / "c.sqlite"
    k, stats = make_gen(encoder, wordnet_texts, server, cache, max_requests=3).generate(classes, ["attribute"])
    assert server.requests == 3 and stats.stopped_by_budget
    assert sum(bool(k.get(c, "attribute")) for c in classes) == 3
    k, stats = make_gen(encoder, wordnet_texts, server, cache).generate(classes, ["attribute"])
    assert server.requests == 5 and not stats.stopped_by_budget
    assert all(k.get(c, "attribute") for c in classes)


def test_concurrency_is_bounded(encoder, wordnet_texts, server, tmp_path):
    server.latency = 0.15
    classes = [f"class {i}" for i in range(12)]
    make_gen(encoder, wordnet_texts, server, tmp_path / "c.sqlite", concurrency=4).generate(classes, ["attribute"])
    assert 2 <= server.max_in_flight <= 4  # requests overlapped, never more than 4 at once


def test_token_usage_is_summed(encoder, wordnet_texts, server, tmp_path):
    gen = make_gen(encoder, wordnet_texts, server, tmp_path / "c.sqlite")
    gen.generate(["cat", "dog", "fox"], ["attribute"])
    assert (gen.llm.usage.prompt_tokens, gen.llm.usage.completion_tokens) == tuple(server.usage_total)
    assert gen.llm.usage.prompt_tokens > 0


def test_one_to_one_both_directions_from_one_prompt(encoder, wordnet_texts, server, tmp_path):
    gen = make_gen(encoder, wordnet_texts, server, tmp_path / "c.sqlite")
    pairs, stopped = gen.one_to_one([("dog", "cat"), ("cat", "dog"), ("cat", "fox")])
    assert not stopped
    assert pairs[("cat", "dog")] == ["cat trait one", "cat trait two"]
    assert pairs[("dog", "cat")] == ["dog trait one"]
    assert pairs[("cat", "fox")] == ["cat trait one", "cat trait two"]
    assert server.by_kind["one_to_one"] == 2
    make_gen(encoder, wordnet_texts, server, tmp_path / "c.sqlite").one_to_one([("fox", "cat")])
    assert server.by_kind["one_to_one"] == 2  # cached, in either direction


def test_key_never_in_errors_logs_or_database(encoder, wordnet_texts, server, tmp_path, caplog):
    caplog.set_level("DEBUG")
    server.faults = ["401_echo_key"]
    cache = tmp_path / "c.sqlite"
    gen = make_gen(encoder, wordnet_texts, server, cache)
    with pytest.raises(LLMError) as err:
        gen.generate(["cat"], ["attribute"])
    assert any(KEY in h for h in server.auth_headers)  # the key was really sent, and echoed back
    assert KEY not in str(err.value) and "***" in str(err.value) and "401" in str(err.value)
    gen = make_gen(encoder, wordnet_texts, server, cache)
    k, _ = gen.generate(["cat", "dog"], ["attribute", "analogous"])
    k.save(tmp_path / "k.json")
    assert KEY not in caplog.text
    assert KEY.encode() not in cache.read_bytes() and KEY not in (tmp_path / "k.json").read_text()
    for extra in tmp_path.glob("c.sqlite*"):
        assert KEY.encode() not in extra.read_bytes()


def test_cli_key_never_printed(server, tmp_path, tiny_model):
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    server.faults = ["401_echo_key"]
    env = {**os.environ, "OPENAI_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "coder_index_cli.main", "-v", "generate", "--classes", str(classes), "--out",
           str(tmp_path / "k.json"), "--base-url", server.base_url, "--llm-model", "fake", "--model", tiny_model,
           "--kinds", "attribute", "--cache", str(tmp_path / "c.sqlite"), "-q"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 1 and "401" in res.stderr
    assert KEY not in res.stdout + res.stderr
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert KEY not in res.stdout + res.stderr and "tokens:" in res.stderr


def test_dry_run_sends_nothing(server, tmp_path, tiny_model):
    from click.testing import CliRunner

    from coder_index_cli.main import cli

    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\nfox\n")
    args = ["generate", "--classes", str(classes), "--out", str(tmp_path / "k.json"), "--base-url",
            server.base_url, "--llm-model", "fake", "--model", tiny_model, "--kinds", "attribute,analogous",
            "--cache", str(tmp_path / "c.sqlite"), "-q"]
    res = CliRunner().invoke(cli, args + ["--dry-run"])
    assert res.exit_code == 0 and "would send 6 prompt(s)" in res.output and server.requests == 0
    assert not (tmp_path / "k.json").exists()
    cache = LLMCache(tmp_path / "c.sqlite")
    llm = LLMClient(LLMConfig(model="fake", base_url=server.base_url), cache)
    cache.put(llm.cache_key(attribute_prompt("dog")), "fake", attribute_prompt("dog"), llm.config.params,
              "- a tail", (1, 1))
    res = CliRunner().invoke(cli, args + ["--dry-run"])
    assert "would send 5 prompt(s)" in res.output and "1 already cached" in res.output


@pytest.mark.parametrize("key", [pytest.param(KEY, marks=pytest.mark.slow), "x"], ids=["secret-key", "placeholder-x"])
def test_killed_run_resumes_from_cache(server, tmp_path, tiny_model, monkeypatch, key):
    """Every answer received before a SIGKILL is in the cache (with a real key and with the
    placeholders local servers take, whose letters appear in ordinary answers: 'texture')."""
    monkeypatch.setenv("OPENAI_API_KEY", key)
    server.latency = 0.1
    n = 24
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(f"class {i}" for i in range(n)) + "\n")
    cache = tmp_path / "c.sqlite"
    cmd = [sys.executable, "-m", "coder_index_cli.main", "generate", "--classes", str(classes), "--out",
           str(tmp_path / "k.json"), "--base-url", server.base_url, "--llm-model", "fake", "--model", tiny_model,
           "--kinds", "attribute", "--cache", str(cache), "--concurrency", "2", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while server.requests < 8 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "k.json").exists()
    with sqlite3.connect(cache) as conn:
        cached = conn.execute("select count(*) from llm_cache").fetchone()[0]
    assert 0 < cached < n
    before = server.requests
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert server.requests - before == n - cached  # only the prompts without a cached answer
    k = json.loads((tmp_path / "k.json").read_text())
    assert len(k["classes"]) == n and all(e["attribute"] for e in k["classes"].values())


def test_missing_key_is_a_clear_error(encoder, monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY")
    llm = LLMClient(LLMConfig(model="gpt-4o-mini"), LLMCache(tmp_path / "c.sqlite"))
    gen = AutoTextGenerator(encoder, llm, synonym_source="wordnet")
    with pytest.raises(LLMError, match="OPENAI_API_KEY"):
        gen.generate(["cat"], ["attribute"])
    assert np.isfinite(encoder.encode_texts(["ok"])).all()


def test_build_generates_on_the_fly(server, tmp_path, tiny_model):
    from click.testing import CliRunner

    from coder_index import TextIndex
    from coder_index_cli.main import cli

    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    args = ["build", str(tmp_path / "idx"), "--classes", str(classes), "--model", tiny_model,
            "--generate", "attribute", "--base-url", server.base_url, "--llm-model", "fake",
            "--cache", str(tmp_path / "c.sqlite")]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    index = TextIndex.open(tmp_path / "idx")
    assert index.counts()["texts"]["attribute"] == 6 and server.requests == 2
    with index.engine.connect() as conn:
        texts = {r[0] for r in conn.exec_driver_sql("select text from texts where kind = 'attribute'")}
    assert "cat which has cat shape" in texts
    assert CliRunner().invoke(cli, args).exit_code == 0 and server.requests == 2  # cached, idempotent


def test_rerank_without_key_fails_before_any_work(tmp_path, tiny_model, monkeypatch):
    from click.testing import CliRunner

    from coder_index_cli.main import cli

    monkeypatch.delenv("OPENAI_API_KEY")
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    assert CliRunner().invoke(cli, ["build", str(tmp_path / "idx"), "--classes", str(classes), "--model",
                                    tiny_model]).exit_code == 0
    (tmp_path / "imgs").mkdir()
    res = CliRunner().invoke(cli, ["classify", str(tmp_path / "imgs"), "--index", str(tmp_path / "idx"), "--out",
                                   str(tmp_path / "p.csv"), "--rerank"])
    assert res.exit_code == 1 and "OPENAI_API_KEY" in res.output
    assert not (tmp_path / "p.csv").exists()


def test_filter_model_is_a_choice(encoder, tiny_model, other_tiny_model, wordnet_texts, server, tmp_path):
    """--filter-model: the analogous filter runs on another CLIP model (the released code: ViT-L-14)."""
    from coder_index_cli.textgen_commands import make_generator

    gen = make_generator(encoder, "openai", server.base_url, "fake", "OPENAI_API_KEY", 2, None, 0.0,
                         str(tmp_path / "c.sqlite"), filter_model=other_tiny_model)
    assert gen.filter_encoder is not gen.encoder
    assert gen.filter_encoder.fingerprint.weights_sha256 != encoder.fingerprint.weights_sha256
    gen._wordnet = wordnet_texts
    k, _ = gen.generate(["cat", "dog"], ["analogous"])
    assert k.provenance["filter_model"]["weights_sha256"] == gen.filter_encoder.fingerprint.weights_sha256
    assert make_generator(encoder, "openai", server.base_url, "fake", "OPENAI_API_KEY", 2, None, 0.0,
                          str(tmp_path / "c.sqlite")).filter_encoder is encoder


def test_malformed_bodies_are_retried_then_reported(encoder, wordnet_texts, server, tmp_path):
    server.faults = ["malformed", "malformed"]
    gen = make_gen(encoder, wordnet_texts, server, tmp_path / "c.sqlite")
    k, _ = gen.generate(["cat"], ["attribute"])
    assert k.get("cat", "attribute") == ["cat shape", "cat colour", "cat texture"]
    assert gen.llm.usage.retries == 2 and server.requests == 3
    server.faults = ["malformed"] * 3
    gen = make_gen(encoder, wordnet_texts, server, tmp_path / "c2.sqlite", max_retries=2)
    k, stats = gen.generate(["cat"], ["attribute"])
    assert k.get("cat", "attribute") == [] and stats.failed == {"attribute": ["cat"]}
    assert "malformed body" in gen.llm.usage.failures[0] and "gave up after 3 attempts" in gen.llm.usage.failures[0]


def test_answers_and_items_are_capped(encoder, wordnet_texts, server, tmp_path):
    from coder_index.textgen.parse import MAX_ITEM_CHARS

    server.faults = ["huge"]
    server.overrides[("attribute", "cat")] = "- whiskers\n- " + "very long prose " * 40 + "\n- tail"
    gen = make_gen(encoder, wordnet_texts, server, tmp_path / "c.sqlite", max_answer_chars=2000)
    k, _ = gen.generate(["cat"], ["attribute"])
    assert k.get("cat", "attribute") == ["whiskers", "tail"]  # the 640-character item is prose, not a feature
    assert gen.llm.usage.truncated_answers == 1
    cached = sqlite3.connect(tmp_path / "c.sqlite").execute("select answer from llm_cache").fetchone()[0]
    assert len(cached) <= 2000 and max(len(x) for x in k.get("cat", "attribute")) <= MAX_ITEM_CHARS


def test_cache_key_includes_the_endpoint(encoder, wordnet_texts, server, tmp_path):
    import socket

    cache = tmp_path / "c.sqlite"
    make_gen(encoder, wordnet_texts, server, cache).generate(["cat"], ["attribute"])
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    llm = LLMClient(LLMConfig(model="fake-model", base_url=dead, max_retries=0, backoff_base=0.01), LLMCache(cache))
    gen = AutoTextGenerator(encoder, llm, wordnet=wordnet_texts)
    k, stats = gen.generate(["cat"], ["attribute"])
    assert llm.usage.cache_hits == 0 and stats.failed == {"attribute": ["cat"]}  # not answered by another server
    assert k.provenance["llm"]["base_url"] == dead
    same = make_gen(encoder, wordnet_texts, server, cache)
    same.generate(["cat"], ["attribute"])
    assert same.llm.usage.cache_hits == 1 and same.llm.usage.requests == 0


def test_an_answer_holding_the_key_is_never_stored(encoder, wordnet_texts, server, tmp_path):
    server.faults = ["answer_key"]
    cache = tmp_path / "c.sqlite"
    gen = make_gen(encoder, wordnet_texts, server, cache)
    k, _ = gen.generate(["cat"], ["attribute"])
    assert k.get("cat", "attribute") == ["cat shape", "cat colour", "cat texture"]  # the retry's clean answer
    assert gen.llm.usage.unusable_answers == 1 and server.requests == 2
    for f in tmp_path.glob("c.sqlite*"):
        assert KEY.encode() not in f.read_bytes()


PLACEHOLDERS = ["x", "X", "EMPTY", "none", "dummy", "sk-no-key-required", "not-needed", "ollama", "lm-studio",
                "token-abc123", "sk-1234", "e", "text", "colour"]


@pytest.mark.parametrize("placeholder", PLACEHOLDERS)
def test_a_placeholder_key_inside_ordinary_answers_is_not_a_leak(encoder, wordnet_texts, server, tmp_path,
                                                                  monkeypatch, placeholder):
    """Local servers take any key; an answer that happens to contain it is kept and cached."""
    from coder_index.core.redaction import could_be_secret

    assert not could_be_secret(placeholder)
    monkeypatch.setenv("OPENAI_API_KEY", placeholder)
    server.overrides[("attribute", "cat")] = f"- {placeholder} texture\n- fur with {placeholder}"
    gen = make_gen(encoder, wordnet_texts, server, tmp_path / "c.sqlite")
    k, stats = gen.generate(["cat", "dog"], ["attribute"])
    assert k.get("cat", "attribute") == [f"{placeholder} texture", f"fur with {placeholder}"]
    assert k.get("dog", "attribute") == ["dog shape", "dog colour", "dog texture"]
    assert gen.llm.usage.unusable_answers == 0 and not stats.missing["attribute"]
    assert gen.llm.scrub(f"error near {placeholder}") == f"error near {placeholder}"  # nothing to hide


@pytest.mark.parametrize("secret", [KEY, "sk-proj-" + "a1B2c3D4" * 6, "0123456789abcdef0123456789abcdef",
                                    "gsk_" + "Zx9" * 12])
def test_keys_that_could_be_secrets_are_guarded(secret):
    from coder_index.core.redaction import could_be_secret

    assert could_be_secret(secret)


def test_generate_fails_clearly_when_classes_get_no_text(server, tmp_path, tiny_model):
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\n")
    server.faults = ["malformed"] * 50
    env = {**os.environ, "OPENAI_API_KEY": KEY}
    cmd = [sys.executable, "-m", "coder_index_cli.main", "generate", "--classes", str(classes), "--out",
           str(tmp_path / "k.json"), "--base-url", server.base_url, "--llm-model", "fake", "--model", tiny_model,
           "--kinds", "attribute,analogous", "--cache", str(tmp_path / "c.sqlite"), "--concurrency", "2",
           "--max-retries", "1", "-q"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 1
    assert "got no answer from the LLM" in res.stderr and "cat" in res.stderr and "nothing was written" in res.stderr
    assert "Traceback" not in res.stderr and "Task exception was never retrieved" not in res.stderr
    assert not (tmp_path / "k.json").exists()


def test_a_fatal_error_leaves_no_stray_task_tracebacks(server, tmp_path, tiny_model):
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(f"class {i}" for i in range(12)) + "\n")
    server.faults = ["401_echo_key"]
    server.latency = 0.2
    env = {**os.environ, "OPENAI_API_KEY": KEY, "PYTHONASYNCIODEBUG": "0"}
    cmd = [sys.executable, "-m", "coder_index_cli.main", "generate", "--classes", str(classes), "--out",
           str(tmp_path / "k.json"), "--base-url", server.base_url, "--llm-model", "fake", "--model", tiny_model,
           "--kinds", "attribute", "--cache", str(tmp_path / "c.sqlite"), "--concurrency", "6", "-q"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 1 and "401" in res.stderr
    assert "Task exception was never retrieved" not in res.stderr and "Traceback" not in res.stderr
