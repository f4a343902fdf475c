"""Query text without its data: every literal replaced by ``?``, comments dropped. No I/O.

Text from pg_stat_activity may be cut short by ``track_activity_query_size``: a string,
a dollar-quoted body or a comment left open runs to the end of the text, and is replaced
as a whole.
"""

from __future__ import annotations

import re

QUERY_CUT = 200

_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<line_comment>--[^\n]*)
    | (?P<block_comment>/\*)
    | (?P<escape_string>[Ee]'(?:[^'\\]|\\.|'')*(?:'|\\?\Z))
    | (?P<string>(?:[BbXxNn]|[Uu]&)?'(?:[^']|'')*(?:'|\Z))
    | (?P<dollar>\$(?:[^\W\d]\w*)?\$)
    | (?P<param>\$\d+)
    | (?P<identifier>(?:[Uu]&)?"(?:[^"]|"")*(?:"|\Z)|[^\W\d]\w*(?:\$\w*)*)
    | (?P<number>(?:0[xX][0-9A-Fa-f_]+|0[oO][0-7_]+|0[bB][01_]+|(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][-+]?\d+)?))
    | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_COMMENT_EDGE = re.compile(r"/\*|\*/")
_SIGN_AFTER = set("(,=<>+-*/%^|&!~[") | {""}


def _end_of_comment(text: str, start: int) -> int:
    """Where a /* comment */ opened at ``start`` ends; comments nest. The text's end if it stays open."""
    depth = 0
    for edge in _COMMENT_EDGE.finditer(text, start):
        depth += 1 if edge.group() == "/*" else -1
        if depth == 0:
            return edge.end()
    return len(text)


def normalize_query(query: str | None) -> str:
    """Every literal replaced by ``?``, comments dropped, white space folded, cut to 200 characters."""
    text = query or ""
    out: list[str] = []
    size = 0
    position = 0
    while position < len(text) and size <= QUERY_CUT:
        match = _TOKEN.match(text, position)
        assert match is not None  # `other` matches any character
        kind, piece = match.lastgroup, match.group()
        position = match.end()
        if kind == "block_comment":
            position = _end_of_comment(text, match.start())
            piece = " "
        elif kind in ("space", "line_comment"):
            piece = " "
        elif kind == "dollar":
            close = text.find(piece, position)
            position = len(text) if close < 0 else close + len(piece)
            piece = "?"
        elif kind in ("escape_string", "string"):
            piece = "?"
        elif kind == "number":
            if out[-1:] == ["-"] and (len(out) < 2 or out[-2].strip()[-1:] in _SIGN_AFTER):
                out.pop()  # a negative number: its sign goes with it
            piece = "?"
        out.append(piece)
        size += len(piece)
    folded = " ".join("".join(out).split())
    return folded if len(folded) <= QUERY_CUT else folded[: QUERY_CUT - 1] + "…"
