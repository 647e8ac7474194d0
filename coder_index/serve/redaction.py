"""Secrets never leave the server: what ``/api/info`` and ``/api/report`` answer is redacted by the
names of its keys and by the look of its values.

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
