"""Regular expressions on names that clients choose: application_name, database names.

A client picks its own application_name, so a filter must never let a name hold a run: with
Python's backtracking engine ``^(a+)+$`` takes minutes on ``'a' * 40 + '!'``. The patterns are
therefore parsed by Python's own parser and run on a small automaton that keeps the set of
its states at each character (Thompson's construction): the time is linear in the length of
the name, whatever the pattern. Results are kept per distinct name.

What needs backtracking is refused when the check starts: backreferences, lookahead and
lookbehind, possessive quantifiers and atomic groups; so are repetition counts above
``MAX_COUNT`` (names are at most 63 bytes) and patterns of more than ``MAX_STATES`` states.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

sre: Any
sre_parse: Any
try:  # Python's own parser of regular expressions (3.11 and later)
    sre = importlib.import_module("re._constants")
    sre_parse = importlib.import_module("re._parser")
except ImportError:  # a Python without it keeps its own engine, results kept per distinct name
    sre = sre_parse = None

MAX_COUNT = 100
MAX_STATES = 5000
CACHE_SIZE = 4096


class PatternRefused(ValueError):
    """A pattern the check cannot use; the message says why."""


Predicate = Callable[[str], bool]
# An instruction: ("char", predicate), ("split", a, b), ("jump", a), ("assert", code), ("match",)
Instruction = tuple[Any, ...]


class NamePattern:
    """A compiled name filter pattern: ``search(name)`` tells whether it matches anywhere in the name."""

    def __init__(self, pattern: str, program: list[Instruction] | None, fallback: re.Pattern[str] | None):
        self.pattern = pattern
        self._program = program
        self._fallback = fallback
        self._cache: dict[str, bool] = {}

    def search(self, name: str) -> bool:
        found = self._cache.get(name)
        if found is None:
            if self._program is not None:
                found = _search(self._program, name)
            else:
                assert self._fallback is not None
                found = self._fallback.search(name) is not None
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            self._cache[name] = found
        return found

    def __repr__(self) -> str:
        return f"NamePattern({self.pattern!r})"


def compile_name_pattern(pattern: str) -> NamePattern:
    try:
        compiled = re.compile(pattern)
    except (re.error, OverflowError, RecursionError, ValueError) as e:
        raise PatternRefused(f"is not a regular expression: {e}") from None
    if sre_parse is None:
        return NamePattern(pattern, None, compiled)
    try:
        parsed = sre_parse.parse(pattern)
        program = _Compiler(parsed.state.flags).program(parsed)
    except RecursionError:
        raise PatternRefused("is nested too deeply") from None
    return NamePattern(pattern, program, None)


# -- compiling ----------------------------------------------------------------------------------
class _Compiler:
    def __init__(self, flags: int):
        self.code: list[Instruction] = []
        self.flags = flags

    def program(self, parsed: Any) -> list[Instruction]:
        self.sequence(parsed, self.flags)
        self.emit(("match",))
        return self.code

    def emit(self, instruction: Instruction) -> int:
        if len(self.code) >= MAX_STATES:
            raise PatternRefused(f"is too large: more than {MAX_STATES} states once its repetitions are counted")
        self.code.append(instruction)
        return len(self.code) - 1

    def sequence(self, items: Any, flags: int) -> None:
        for op, av in items:
            self.item(op, av, flags)

    def item(self, op: Any, av: Any, flags: int) -> None:
        ignore_case = bool(flags & re.IGNORECASE)
        if op is sre.LITERAL:
            self.emit(("char", _literal(chr(av), ignore_case)))
        elif op is sre.NOT_LITERAL:
            same = _literal(chr(av), ignore_case)
            self.emit(("char", lambda c: not same(c)))
        elif op is sre.ANY:
            self.emit(("char", (lambda c: True) if flags & re.DOTALL else (lambda c: c != "\n")))
        elif op is sre.IN:
            self.emit(("char", _in(av, ignore_case, bool(flags & re.ASCII))))
        elif op is sre.AT:
            self.emit(("assert", (av, bool(flags & re.MULTILINE), bool(flags & re.ASCII))))
        elif op is sre.BRANCH:
            self.branch(av[1], flags)
        elif op is sre.SUBPATTERN:
            _group, add, remove, items = av
            self.sequence(items, (flags | add) & ~remove)
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT):  # greedy or lazy: the same for whether it matches
            low, high, items = av
            self.repeat(low, high, items, flags)
        elif op in (sre.GROUPREF, sre.GROUPREF_EXISTS):
            raise PatternRefused("uses a backreference, which needs backtracking; name filters do without")
        elif op in (sre.ASSERT, sre.ASSERT_NOT):
            raise PatternRefused("uses a lookahead or lookbehind, which needs backtracking; name filters do without")
        elif op in (sre.POSSESSIVE_REPEAT, sre.ATOMIC_GROUP):
            raise PatternRefused("uses a possessive quantifier or an atomic group; name filters do without")
        else:
            raise PatternRefused(f"uses {str(op).lower()}, which name filters do not support")

    def branch(self, alternatives: list[Any], flags: int) -> None:
        jumps = []
        for index, alternative in enumerate(alternatives):
            if index < len(alternatives) - 1:
                split = self.emit(("split", 0, 0))
                self.sequence(alternative, flags)
                jumps.append(self.emit(("jump", 0)))
                self.code[split] = ("split", split + 1, len(self.code))
            else:
                self.sequence(alternative, flags)
        for jump in jumps:
            self.code[jump] = ("jump", len(self.code))

    def repeat(self, low: int, high: int, items: Any, flags: int) -> None:
        unbounded = high == sre.MAXREPEAT
        if low > MAX_COUNT or (not unbounded and high > MAX_COUNT):
            raise PatternRefused(f"repeats more than {MAX_COUNT} times; names are at most 63 bytes")
        for _ in range(low):
            self.sequence(items, flags)
        if unbounded:
            split = self.emit(("split", 0, 0))
            self.sequence(items, flags)
            self.emit(("jump", split))
            self.code[split] = ("split", split + 1, len(self.code))
            return
        splits = []
        for _ in range(high - low):
            splits.append(self.emit(("split", 0, 0)))
            self.sequence(items, flags)
        for split in splits:
            self.code[split] = ("split", split + 1, len(self.code))


def _literal(char: str, ignore_case: bool) -> Predicate:
    if not ignore_case:
        return lambda c: c == char
    forms = {char, char.lower(), char.upper()}
    return lambda c: c in forms or c.lower() in forms or c.upper() in forms


def _category(code: Any, ascii_only: bool) -> Predicate:
    if code is sre.CATEGORY_DIGIT:
        return (lambda c: "0" <= c <= "9") if ascii_only else str.isdecimal
    if code is sre.CATEGORY_NOT_DIGIT:
        digit = _category(sre.CATEGORY_DIGIT, ascii_only)
        return lambda c: not digit(c)
    if code is sre.CATEGORY_SPACE:
        return (lambda c: c in " \t\n\r\f\v") if ascii_only else str.isspace
    if code is sre.CATEGORY_NOT_SPACE:
        space = _category(sre.CATEGORY_SPACE, ascii_only)
        return lambda c: not space(c)
    if code is sre.CATEGORY_WORD:
        return (lambda c: c.isascii() and (c.isalnum() or c == "_")) if ascii_only else _is_word
    if code is sre.CATEGORY_NOT_WORD:
        word = _category(sre.CATEGORY_WORD, ascii_only)
        return lambda c: not word(c)
    raise PatternRefused(f"uses the class {str(code).lower()}, which name filters do not support")


def _is_word(c: str) -> bool:
    return c.isalnum() or c == "_"


def _between(low: str, high: str) -> Predicate:
    return lambda c: low <= c <= high


def _in(items: list[Any], ignore_case: bool, ascii_only: bool) -> Predicate:
    negate = False
    tests: list[Predicate] = []
    for op, av in items:
        if op is sre.NEGATE:
            negate = True
        elif op is sre.LITERAL:
            tests.append(_literal(chr(av), False))
        elif op is sre.RANGE:
            tests.append(_between(chr(av[0]), chr(av[1])))
        elif op is sre.CATEGORY:
            tests.append(_category(av, ascii_only))
        else:
            raise PatternRefused(f"uses {str(op).lower()} in a class, which name filters do not support")

    def member(c: str) -> bool:
        forms = (c, c.lower(), c.upper()) if ignore_case else (c,)
        return any(test(form) for form in forms for test in tests)

    return (lambda c: not member(c)) if negate else member


# -- matching ------------------------------------------------------------------------------------
def _holds(condition: tuple[Any, bool, bool], text: str, at: int) -> bool:
    code, multiline, ascii_only = condition
    size = len(text)
    if code is sre.AT_BEGINNING:
        return at == 0 or (multiline and text[at - 1] == "\n")
    if code is sre.AT_BEGINNING_STRING:
        return at == 0
    if code is sre.AT_END:
        if multiline:
            return at == size or text[at] == "\n"
        return at == size or (at == size - 1 and text[at] == "\n")
    if code is sre.AT_END_STRING:
        return at == size
    word = _category(sre.CATEGORY_WORD, ascii_only)
    before = at > 0 and word(text[at - 1])
    after = at < size and word(text[at])
    if code is sre.AT_BOUNDARY:
        return before != after
    if code is sre.AT_NON_BOUNDARY:
        return before == after
    raise PatternRefused(f"uses {str(code).lower()}, which name filters do not support")


def _search(program: list[Instruction], text: str) -> bool:
    """Whether the program matches anywhere in the text: each state is visited once per position."""
    current: list[int] = []
    for at in range(len(text) + 1):
        seen: set[int] = set()
        ready: list[int] = []
        stack = [*reversed(current), 0]  # the threads carried over, and a new one starting here
        while stack:
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            instruction = program[pc]
            kind = instruction[0]
            if kind == "match":
                return True
            if kind == "jump":
                stack.append(instruction[1])
            elif kind == "split":
                stack.append(instruction[2])
                stack.append(instruction[1])
            elif kind == "assert":
                if _holds(instruction[1], text, at):
                    stack.append(pc + 1)
            else:
                ready.append(pc)
        if at == len(text):
            break
        char = text[at]
        current = [pc + 1 for pc in ready if program[pc][1](char)]
    return False
