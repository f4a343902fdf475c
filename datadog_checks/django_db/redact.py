"""Masking secrets where they can appear in a text: connection parameters and URLs.

A secret is masked by its place, never by searching the text for it: a password such as
``on`` must not turn ``connection`` into ``c********necti********``. The places are
- the value of a password-like key: ``password=x``, ``password='x y'``, ``PGPASSWORD=x``,
  ``password: x``, ``"password": "x"``;
- the password of a URL's user information: ``postgresql://user:x@host/db``.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

MASK = "********"

# Keys whose value is a secret: password, passwd, pwd, passphrase, secret, token, api_key ...
_KEY = r"[A-Za-z_]*(?:password|passwd|passphrase|pwd|secret|token|api_?key)"
_VALUE = r"""'(?:[^'\\]|\\.|'')*'?|"(?:[^"\\]|\\.)*"?|[^\s,;&'")}\]]+"""
_KEY_VALUE = re.compile(rf"""(?P<key>(?<![A-Za-z0-9])["']?{_KEY}["']?\s*[=:]\s*)(?P<value>{_VALUE})""", re.IGNORECASE)
_URL = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@]*:)(?P<value>[^\s@/?#]*)(?=@)")


def _mask(match: re.Match[str]) -> str:
    value = match["value"]
    quote = value[0] if value[:1] in ("'", '"') else ""
    return f"{match['key']}{quote}{MASK}{quote}"


def redact(text: str) -> str:
    """The text with every secret in a connection parameter or URL masked."""
    text = _URL.sub(lambda m: m["head"] + MASK, text)
    return _KEY_VALUE.sub(_mask, text)


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
