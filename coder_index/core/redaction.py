"""The one redaction module: secrets never reach messages, logs, stored records or served answers.

* ``redact`` / ``redact_text``: what serve answers (``/api/info``, ``/api/report``) is redacted by
  the names of its keys and by the look of its values (below).
* ``public_url`` (and ``redact_url``, the same for an optional URL): a URL as it may be shown, stored or
  made a key: no ``user:password@``, no signing or credential parameters (``X-Amz-Signature``,
  ``sig=``, tokens), so that a freshly signed URL names the same thing; a ``pipe:`` command with its
  secret-looking words redacted. The one rule for every URL coder-index shows.
* ``could_be_secret`` and ``SecretFilter``: an API key from the environment, scrubbed from every
  log record and message (a placeholder key such as "x" is not a secret).

Redaction of values:

* **Names**: a value under a key that names a secret (``api_key``, ``X-Api-Key``, ``openai_key``,
  ``token``, ``access_token``, ``secret``, ``password``, ``authorization``, ``cookie``,
  ``credentials``, ``private_key``, ...) is replaced whole, at any depth.
* **Values**: in every string, credentials in URLs (``https://user:key@host``, ``https://token@host``),
  ``Bearer`` tokens, keys in the formats providers use (``sk-...``, ``ghp_...``, ``hf_...``,
  ``AKIA...``, ``xoxb-...``, ``AIza...``), long random-looking words (32 characters or more of upper
  and lower case letters and digits, without separators: not a hex digest, which is all lower case,
  nor a file name), and the value of
  every environment variable whose name names a secret (``OPENAI_API_KEY``) are replaced.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

REDACTED = "<redacted>"
_SECRET_NAME = re.compile(r"(api_?key|secret|passw(or)?d|authori[sz]ation|credential|cookie|private_?key|"
                          r"_key$|^auth$|_auth$|(^|_)token(s)?$|^bearer$|signature)")
_SECRET_VALUE = re.compile(
    r"(?P<url>(?<=://)[^/\s@'\"]+(?=@))"                    # user:password@ or token@ in a URL
    r"|(?P<bearer>(?<=Bearer )[^\s'\"]+)"
    r"|(?P<known>\b(?:sk|pk|rk)-[A-Za-z0-9_\-]{16,}|\bgh[pousr]_[A-Za-z0-9]{20,}|\bgithub_pat_[A-Za-z0-9_]{20,}"
    r"|\bhf_[A-Za-z0-9]{20,}|\bAKIA[0-9A-Z]{16}\b|\bxox[abposr]-[A-Za-z0-9\-]{10,}|\bAIza[0-9A-Za-z_\-]{30,})"
    r"|(?P<random>\b[A-Za-z0-9+=]{32,})")


def secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(str(name).lower().replace("-", "_")))


def _looks_random(s: str) -> bool:
    return any(c.isupper() for c in s) and any(c.islower() for c in s) and any(c.isdigit() for c in s)


def _env_secrets() -> list[str]:
    return sorted({v for k, v in os.environ.items() if secret_name(k) and len(v) >= 8}, key=len, reverse=True)


def redact_text(text: str, env_secrets: list[str] | None = None) -> str:
    """``text`` with every secret-looking part replaced."""
    for value in _env_secrets() if env_secrets is None else env_secrets:
        text = text.replace(value, REDACTED)

    def sub(m: re.Match) -> str:
        if m.group("random") is not None and not _looks_random(m.group("random")):
            return m.group(0)
        return REDACTED

    return _SECRET_VALUE.sub(sub, text)


def redact(obj: Any, _env: list[str] | None = None) -> Any:
    """A copy of a JSON-like value with secrets replaced (see the module docstring)."""
    env = _env_secrets() if _env is None else _env
    if isinstance(obj, dict):
        return {k: (REDACTED if secret_name(k) and obj[k] not in (None, "") else redact(v, env))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, env) for v in obj]
    if isinstance(obj, Path):
        return redact_text(str(obj), env)
    if isinstance(obj, str):
        return redact_text(obj, env)
    return obj


# query parameters that sign or authorise a URL: dropped from what is shown (and from row names, so
# that a rerun with a freshly signed URL names the same rows)
_SECRET_PARAM = re.compile(r"^(x-amz-|x-goog-|signature$|sig$|se$|sp$|sv$|sr$|st$|spr$|skoid$|sktid$|skt$|ske$|"
                           r"sks$|skv$|expires$|awsaccesskeyid$|googleaccessid$|.*token.*|.*secret.*|.*passw.*|"
                           r"key$|api[_-]?key$|auth.*|credential.*|policy$|x-oss-|ossaccesskeyid$)", re.IGNORECASE)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def public_url(spec: str) -> str:
    """What may be shown of ``spec``: no ``user:password@``, no signing or credential parameters; a
    ``pipe:`` command with its secret-looking words redacted; anything else (a path) as it is."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    spec = str(spec)
    if spec.startswith("pipe:"):
        return redact_text(re.sub(r"(\s(?:-u|--user|--password|--token)[ =])\S+", r"\1<redacted>", spec))
    if not _URL.match(spec):
        return spec
    parts = urlsplit(spec)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not _SECRET_PARAM.match(k)]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), ""))


def redact_url(url: str | None) -> str | None:
    """``public_url`` of an optional URL (an LLM endpoint): what is stored, printed or made a cache key."""
    return public_url(url) if url else url


# Keys that local servers (vLLM, Ollama, llama.cpp, LM Studio, LiteLLM) take as "no key": not secrets.
PLACEHOLDER_KEYS = frozenset({"", "x", "xx", "xxx", "none", "null", "empty", "dummy", "test", "key", "api-key",
                              "not-needed", "no-key", "nokey", "sk-no-key-required", "sk-xxx", "sk-1234",
                              "ollama", "lm-studio", "llama", "vllm", "token-abc123", "placeholder", "changeme"})


def could_be_secret(key: str) -> bool:
    """Whether an API key could be a secret worth guarding: not a known placeholder, at least 16
    characters, and (being random) holding a digit, or at least 24 characters. Providers' keys are
    32 characters and more; the placeholders local servers take ("x", "EMPTY", "sk-no-key-required")
    are words. Only such keys are scrubbed from messages and refused in answers: with a placeholder
    key "x", an answer mentioning "texture" is an answer, not a leak."""
    key = key.strip()
    if key.lower() in PLACEHOLDER_KEYS or len(key) < 16:
        return False
    return any(ch.isdigit() for ch in key) or len(key) >= 24


class SecretFilter(logging.Filter):
    """Replaces a secret in every log record that passes through a handler."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secret:
            msg = record.getMessage()
            if self.secret in msg:
                record.msg, record.args = msg.replace(self.secret, "***"), None
        return True
