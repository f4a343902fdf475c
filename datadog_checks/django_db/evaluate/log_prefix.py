"""The application's name in PostgreSQL's log lines, where ``log_line_prefix`` carries it (``%a``). No I/O.

A line is ``<prefix><SEVERITY>:  <message>``. The prefix is matched, whole, against what comes before the
severity: its escapes become bounded patterns (names are at most 63 bytes; numbers and times have their
own shapes), its other characters themselves. An application chooses its own name, which may hold any
of the prefix's separators: the bounds keep a line's matching short whatever it holds (only the user,
database and application names may hold anything, and each is at most 64 characters).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

AppOf = Callable[[str], str | None]

NAME = r"[^\n]{0,64}?"  # names PostgreSQL cuts at 63 bytes, with room for padding
TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?(?: [^\s\]]+)?"
ESCAPES = {
    "a": rf"(?P<app>{NAME})",
    "p": r"-?\d*",
    "P": r"-?\d*",
    "l": r"\d*",
    "n": r"[\d.]*",
    "t": TIME,
    "m": TIME,
    "s": TIME,
    "x": r"\d*",
    "v": r"[\d/-]*",
    "e": r"[0-9A-Z]{5}",
    "c": r"[0-9a-f.]*",
    "Q": r"-?\d*",
    "h": r"\S{0,300}?",  # a host or address: no spaces
    "r": r"\S{0,300}?",  # the same with (port), or [local]
    "b": r"[a-z ]{0,64}?",  # backend type: "client backend"
    "i": r"[A-Za-z ]{0,64}?",  # command tag: "SELECT", "idle"
    "q": "",  # lines of sessions go on past it; others stop there, and name no application
    "%": "%",
}
ESCAPE = re.compile(r"%(-?\d+)?(.)", re.DOTALL)
SEVERITY = re.compile(r"(?:DEBUG\d|LOG|INFO|NOTICE|WARNING|ERROR|FATAL|PANIC|STATEMENT|DETAIL|HINT|CONTEXT):  ")
UNKNOWN_APP = "[unknown]"  # what %a prints for a session without application_name
TRIES = 3  # severity-like words a line may hold before its own (in the application's name)


@lru_cache(maxsize=16)
def app_finder(log_line_prefix: str) -> AppOf | None:
    """A function giving a PostgreSQL log line's application name ('' for none), or None where the line does
    not have the prefix's shape; None instead of a function where the prefix carries no ``%a``."""
    parts, at, has_app = [], 0, False
    for escape in ESCAPE.finditer(log_line_prefix):
        parts.append(re.escape(log_line_prefix[at : escape.start()]))
        padded, letter = escape.group(1), escape.group(2)
        if letter == "a" and has_app:
            field = NAME  # a second %a: the first one names it
        else:
            field = ESCAPES.get(letter, NAME)
        has_app = has_app or letter == "a"
        parts.append(f" *{field} *" if padded else field)
        at = escape.end()
    parts.append(re.escape(log_line_prefix[at:]))
    if not has_app:
        return None
    pattern = re.compile("".join(parts), re.DOTALL)

    def app_of(line: str) -> str | None:
        for n, severity in enumerate(SEVERITY.finditer(line)):
            if n == TRIES:
                break
            match = pattern.fullmatch(line, 0, severity.start())
            if match is not None:
                app = match["app"].strip()
                return "" if app == UNKNOWN_APP else app
        return None

    return app_of
