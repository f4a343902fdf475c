"""Masking secrets where they can appear in a text: connection parameters, URLs, and the
instance's own secrets wherever a server or proxy echoes them.

A secret is masked by its place, or as a whole token, never as a part of a word: a password such as
``on`` must not turn ``connection`` into ``c********necti********``. The places are
- the value of a password-like key: ``password=x``, ``password='x y'``, ``PGPASSWORD=x``,
  ``password: x``, ``"password": "x"``;
- the password of a URL's user information: ``postgresql://user:x@host/db``;
- a configured secret, quoted or between characters that are not part of a word:
  ``password "on" is not valid``;
- a managed login token (managed.py): an RDS IAM token's signature and credentials
  (``X-Amz-Signature=...``), an Azure token (a JSON Web Token, ``eyJ...``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

MASK = "********"

# Keys whose value is a secret: password, passwd, pwd, passphrase, secret, token, api_key ...
_KEY = r"[A-Za-z_]*(?:password|passwd|passphrase|pwd|secret|token|api_?key)"
_VALUE = r"""'(?:[^'\\]|\\.|'')*'?|"(?:[^"\\]|\\.)*"?|[^\s,;&'")}\]]+"""
_KEY_VALUE = re.compile(rf"""(?P<key>(?<![A-Za-z0-9])["']?{_KEY}["']?\s*[=:]\s*)(?P<value>{_VALUE})""", re.IGNORECASE)
_AWS_TOKEN = re.compile(r"(?P<key>X-Amz-(?:Signature|Security-Token|Credential)=)(?P<value>[^&\s'\"]+)", re.IGNORECASE)
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")
_URL = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@]*:)(?P<value>[^\s@/?#]*)(?=@)")


def _mask(match: re.Match[str]) -> str:
    value = match["value"]
    quote = value[0] if value[:1] in ("'", '"') else ""
    return f"{match['key']}{quote}{MASK}{quote}"


def redact(text: str, secrets: Sequence[re.Pattern[str]] = ()) -> str:
    """The text with every secret in a connection parameter or URL masked, and every one of ``secrets``
    (made by ``secret_patterns``) where it stands as a whole token."""
    text = _URL.sub(lambda m: m["head"] + MASK, text)
    text = _KEY_VALUE.sub(_mask, text)
    text = _AWS_TOKEN.sub(lambda m: m["key"] + MASK, text)
    text = _JWT.sub(MASK, text)
    for pattern in secrets:
        text = pattern.sub(MASK, text)
    return text


def secret_patterns(secrets: Iterable[str]) -> tuple[re.Pattern[str], ...]:
    """A pattern per secret, longest first, that finds it as a whole token: not preceded or followed by
    a character of a word where its own first or last character is one."""
    patterns = []
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        head = r"(?<!\w)" if re.match(r"\w", secret[0]) else ""
        tail = r"(?!\w)" if re.match(r"\w", secret[-1]) else ""
        patterns.append(re.compile(head + re.escape(secret) + tail))
    return tuple(patterns)


def instance_secrets(value: Any) -> list[str]:
    """Every configured value of a password-like key in an instance, at any depth."""
    found: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(item, str) and re.fullmatch(_KEY, str(key), re.IGNORECASE):
                found.append(item)
            else:
                found += instance_secrets(item)
    elif isinstance(value, list | tuple):
        for item in value:
            found += instance_secrets(item)
    return found


def looks_like_connection_string(text: str) -> bool:
    """A libpq URL or a key=value connection string."""
    return bool(re.match(r"\s*[A-Za-z][A-Za-z0-9+.-]*://", text)) or bool(re.search(r"\w\s*=", text))


def bare_url(url: str) -> str:
    """A URL without its user information, query string or fragment: what a tag or message may show."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unreadable url>"
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
