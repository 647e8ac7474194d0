"""The one redaction module: secrets never reach messages, logs, stored records or served answers.

* ``redact`` / ``redact_text``: what serve answers (``/api/info``, ``/api/report``) is redacted by
  the names of its keys and by the look of its values (below).
* ``redact_url``: the user:password@ of a URL, before it is stored, printed or made a cache key.
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


def redact_url(url: str | None, mask: str = "***") -> str | None:
    """The URL without its user:password@ (``mask`` in its place), for what is stored or printed."""
    return re.sub(r"//[^/@]+@", f"//{mask}@", url) if url else url


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
