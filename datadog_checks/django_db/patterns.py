"""Regular expressions on names that clients choose (application_name, database names)."""

from __future__ import annotations

import re

NamePattern = re.Pattern[str]


class PatternRefused(ValueError):
    """A pattern the check cannot use; the message says why."""


def compile_name_pattern(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except (re.error, OverflowError, RecursionError, ValueError) as e:
        raise PatternRefused(f"is not a regular expression: {e}") from None
