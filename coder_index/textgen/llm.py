"""An OpenAI-compatible chat client that never pays twice for a prompt.

* every usable answer is cached in SQLite, keyed by (endpoint, model, messages, sampling
  parameters); an answer that contains the API key is never stored;
* 429 / 5xx / timeouts / connection errors / malformed bodies are retried with exponential backoff
  and jitter, honouring ``retry-after``, then reported clearly;
* answers are capped at ``max_answer_chars`` (a 5 MB answer is not a list of attributes);
* at most ``concurrency`` requests are in flight; ``max_requests`` is a hard budget on HTTP
  requests sent (retries included) that stops cleanly before it is exceeded;
* the API key is read from the environment, passed to the client and nowhere else: it is scrubbed
  from every error message and log record.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Integer, MetaData, String, Table, Text, insert, select

from coder_index.core.atomic import cache_dir, translate_disk_full
from coder_index.core.errors import CoderIndexError
from coder_index.core.redaction import SecretFilter, could_be_secret, redact_url
from coder_index.stores.schema import make_engine

log = logging.getLogger(__name__)

_meta = MetaData()
llm_cache = Table(
    "llm_cache", _meta,
    Column("key", String(64), primary_key=True),
    Column("model", Text, nullable=False),
    Column("messages", Text, nullable=False),
    Column("params", Text, nullable=False),
    Column("answer", Text, nullable=False),
    Column("prompt_tokens", Integer, nullable=True),
    Column("completion_tokens", Integer, nullable=True),
    Column("created_at", Text, nullable=False),
)


class LLMError(CoderIndexError):
    """The endpoint refused the request for a reason retrying cannot fix (auth, bad model, ...)."""


class BudgetExhausted(CoderIndexError):
    """The next request would exceed --max-requests."""


class MalformedResponse(Exception):
    """The endpoint's body was not the JSON of a chat completion."""


DEFAULT_ENDPOINT = "https://api.openai.com/v1"
MAX_ANSWER_CHARS = 4000


def endpoint_id(base_url: str | None) -> str:
    """The endpoint as part of a cache key: without credentials or a trailing slash."""
    return (redact_url(base_url) or DEFAULT_ENDPOINT).rstrip("/")


def default_cache_path() -> Path:
    return cache_dir() / "llm-cache.sqlite"


class LLMCache:
    """SQLite answer cache; safe to share between runs and vocabularies."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else default_cache_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(self.path, synchronous="NORMAL")
        with translate_disk_full(self.path):
            _meta.create_all(self.engine)

    @staticmethod
    def key(model: str, messages: list[dict[str, str]], params: dict[str, Any], endpoint: str | None = None,
            repeat: int = 0) -> str:
        """One entry per endpoint, model, prompt and sampling parameters: the same model name at
        another server is another model. ``repeat`` n > 0 is the n-th fresh asking of the same
        prompt (the released analogous loop asks one prompt several times)."""
        entry = {"endpoint": endpoint or DEFAULT_ENDPOINT, "model": model, "messages": messages, "params": params}
        if repeat:
            entry["repeat"] = repeat  # absent for 0: keys of earlier releases stay valid
        blob = json.dumps(entry, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(llm_cache.c.answer).where(llm_cache.c.key == key)).scalar()

    def put(self, key: str, model: str, messages: list[dict[str, str]], params: dict[str, Any], answer: str,
            usage: tuple[int, int]) -> None:
        row = {"key": key, "model": model, "messages": json.dumps(messages, ensure_ascii=False),
               "params": json.dumps(params, sort_keys=True), "answer": answer, "prompt_tokens": usage[0],
               "completion_tokens": usage[1], "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with translate_disk_full(self.path), self.engine.begin() as conn:
            conn.execute(insert(llm_cache).prefix_with("OR REPLACE"), row)

    def __len__(self) -> int:
        with self.engine.connect() as conn:
            return len(conn.execute(select(llm_cache.c.key)).all())


DEFAULT_MAX_TOKENS = 600  # enough for the longest list the prompts ask for; a runaway answer stops there


def default_max_tokens(prompts: str) -> int | None:
    """The max_tokens a request carries unless --max-tokens says otherwise: none under the cvpr24
    preset (the released generator sends the model and the messages only), else DEFAULT_MAX_TOKENS."""
    return None if prompts == "cvpr24" else DEFAULT_MAX_TOKENS


@dataclass
class LLMConfig:
    model: str
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    max_requests: int | None = None
    timeout: float = 60.0
    max_retries: int = 6
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    temperature: float = 0.0
    max_tokens: int | None = DEFAULT_MAX_TOKENS  # None: not sent (the endpoint's own limit)
    bad_answer_retries: int = 1
    max_answer_chars: int = MAX_ANSWER_CHARS

    @property
    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"temperature": self.temperature}
        if self.max_tokens is not None:
            params["max_tokens"] = self.max_tokens
        return params


@dataclass
class LLMUsage:
    requests: int = 0            # HTTP requests sent, retries included
    cache_hits: int = 0
    retries: int = 0
    unusable_answers: int = 0    # empty, refused or unparseable
    truncated_answers: int = 0   # longer than max_answer_chars
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        cut = f", {self.truncated_answers} cut to the answer cap" if self.truncated_answers else ""
        return (f"{self.requests} request(s) sent, {self.cache_hits} answered from cache, {self.retries} retried, "
                f"{self.unusable_answers} unusable answer(s){cut}; tokens: {self.prompt_tokens} prompt + "
                f"{self.completion_tokens} completion = {self.prompt_tokens + self.completion_tokens}")


class LLMClient:
    """Async, cached, budgeted chat completions against any OpenAI-compatible endpoint."""

    def __init__(self, config: LLMConfig, cache: LLMCache | None = None) -> None:
        self.config = config
        self.cache = cache if cache is not None else LLMCache()  # an empty cache is falsy (__len__)
        self.usage = LLMUsage()
        self._key = os.environ.get(config.api_key_env, "")
        # what must never appear in messages, logs or stored answers (a placeholder key is no secret)
        self._secret = self._key if could_be_secret(self._key) else ""
        self._client: Any = None
        self._sem: asyncio.Semaphore | None = None
        self._sent = 0
        self._filter = SecretFilter(self._secret)
        for handler in logging.getLogger().handlers:
            handler.addFilter(self._filter)

    # -- secrets ---------------------------------------------------------------------------
    def scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _api_key(self) -> str:
        if self._key:
            return self._key
        if self.config.base_url:  # local servers (vLLM, Ollama, llama.cpp) often need no key
            return "not-needed"
        raise LLMError(f"no API key: set the environment variable {self.config.api_key_env} "
                       "(or name another variable with --api-key-env), or pass --base-url for a local server")

    def check_credentials(self) -> None:
        """Raise LLMError now if no key is available (instead of at the first request)."""
        self._api_key()

    def _ensure_client(self) -> Any:
        if self._client is None:
            from openai import AsyncOpenAI

            self._client = AsyncOpenAI(api_key=self._api_key(), base_url=self.config.base_url,
                                       timeout=self.config.timeout, max_retries=0)
            self._sem = asyncio.Semaphore(self.config.concurrency)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    # -- cache -----------------------------------------------------------------------------
    def cache_key(self, messages: list[dict[str, str]], repeat: int = 0) -> str:
        return LLMCache.key(self.config.model, messages, self.config.params, endpoint_id(self.config.base_url),
                            repeat)

    def cached(self, messages: list[dict[str, str]]) -> str | None:
        return self.cache.get(self.cache_key(messages))

    # -- requests --------------------------------------------------------------------------
    def _reserve(self) -> None:
        budget = self.config.max_requests
        if budget is not None and self._sent >= budget:
            raise BudgetExhausted(f"request budget of {budget} reached")
        self._sent += 1
        self.usage.requests += 1

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.config.backoff_max)
        backoff = min(self.config.backoff_max, self.config.backoff_base * (2 ** attempt))
        return backoff * (0.5 + random.random() / 2)  # jitter: spread the retries of many clients

    @staticmethod
    def _retry_after(exc: Any) -> float | None:
        response = getattr(exc, "response", None)
        value = response.headers.get("retry-after") if response is not None else None
        if value is None:
            return None
        try:
            return float(value)
        except ValueError:
            parsed = email.utils.parsedate_to_datetime(value)
            return max(0.0, parsed.timestamp() - time.time()) if parsed else None

    async def complete(self, messages: list[dict[str, str]],
                       usable: Callable[[str], bool] = bool, *, repeat: int = 0) -> str | None:
        """The answer to ``messages`` (from cache if there), or None when no usable answer came.
        ``repeat`` n > 0 asks the same messages afresh for the n-th time (cached apart).

        Raises BudgetExhausted before a request that would exceed the budget, LLMError on
        non-retryable errors (the key scrubbed from the message).
        """
        import openai

        key = self.cache_key(messages, repeat)
        hit = self.cache.get(key)
        if hit is not None:
            self.usage.cache_hits += 1
            return hit
        client = self._ensure_client()
        assert self._sem is not None
        bad_answers = 0
        attempt = 0
        while True:
            async with self._sem:
                self._reserve()
                try:
                    resp = await client.chat.completions.create(
                        model=self.config.model, messages=messages, **self.config.params)
                    error: Exception | None = None
                except (openai.APITimeoutError, openai.APIConnectionError, openai.RateLimitError,
                        openai.InternalServerError) as exc:
                    error = exc
                except (json.JSONDecodeError, openai.APIResponseValidationError, UnicodeDecodeError) as exc:
                    # a body that is not the JSON the API promises: a broken proxy or server, retried like 5xx
                    error = MalformedResponse(f"the endpoint answered with a malformed body ({exc})")
                except openai.APIStatusError as exc:
                    if exc.status_code >= 500:
                        error = exc
                    else:
                        raise LLMError(self.scrub(f"the LLM endpoint refused the request (HTTP {exc.status_code}): "
                                                  f"{exc.message}")) from None
                except openai.OpenAIError as exc:
                    raise LLMError(self.scrub(f"LLM request failed: {exc.__class__.__name__}: {exc}")) from None
            if error is not None:
                if attempt >= self.config.max_retries:
                    msg = self.scrub(f"gave up after {attempt + 1} attempts: {error.__class__.__name__}: {error}")
                    self.usage.failures.append(msg)
                    log.warning("%s", msg)
                    return None
                delay = self._delay(attempt, self._retry_after(error))
                log.info("LLM request failed (%s); retrying in %.2fs", error.__class__.__name__, delay)
                self.usage.retries += 1
                attempt += 1
                await asyncio.sleep(delay)
                continue
            text, tokens = self._read(resp)
            if len(text) > self.config.max_answer_chars:
                self.usage.truncated_answers += 1
                cut = text[: self.config.max_answer_chars]
                text = cut[: cut.rfind("\n")] if "\n" in cut else cut  # whole lines only
            if self._secret and self._secret in text:
                text = ""  # an answer that repeats the key is never stored (nor used): counted as unusable below
            if text.strip() and usable(text):
                self.cache.put(key, self.config.model, messages, self.config.params, text, tokens)
                return text
            self.usage.unusable_answers += 1
            if bad_answers >= self.config.bad_answer_retries:
                return None
            bad_answers += 1

    def _read(self, resp: Any) -> tuple[str, tuple[int, int]]:
        usage = getattr(resp, "usage", None)
        tokens = (int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0))
        self.usage.prompt_tokens += tokens[0]
        self.usage.completion_tokens += tokens[1]
        choices = getattr(resp, "choices", None) or []
        if not choices:
            return "", tokens
        message = choices[0].message
        if getattr(message, "refusal", None):
            return "", tokens
        # as sent: the released reader keeps the spaces at an answer's ends (an item's, a refused name's)
        return message.content or "", tokens
