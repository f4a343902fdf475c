"""Name filters on names clients choose: no application_name may hold a run."""

from __future__ import annotations

import re
import threading

import pytest
from datadog_checks.base import ConfigurationError
from hypothesis import given, settings
from hypothesis import strategies as st

from datadog_checks.django_db import DjangoDbCheck
from datadog_checks.django_db.patterns import compile_name_pattern
from django_db_tools.sandbox import Sandbox

from .conftest import metric_values

HOSTILE = "a" * 40 + "!"  # with Python's backtracking engine, ^(a+)+$ takes minutes on it


def test_a_hostile_application_name_cannot_hold_a_run(aggregator, dd_run_check, sandbox, clients):
    clients.connect(app=HOSTILE)
    clients.connect(app="aaaa")
    instance = {
        "postgres": sandbox.postgres.instance(Sandbox.MONITOR_USER, Sandbox.MONITOR_PASSWORD),
        "applications": {"include": ["^(a+)+$"]},
        "group_by": ["app"],
    }
    check = DjangoDbCheck("django_db", {}, [instance])
    run = threading.Thread(target=dd_run_check, args=(check,), daemon=True)
    run.start()
    run.join(timeout=60)
    assert not run.is_alive(), "the run is held by the name filter"
    check.cancel()
    assert metric_values(aggregator, "django_db.postgres.connections", "app:aaaa", "state:idle") == [1]
    assert not [m for m in aggregator.metrics("django_db.postgres.connections") if f"app:{HOSTILE}" in m.tags]


@pytest.mark.parametrize(
    "pattern, why",
    [
        (r"^(web)\1$", "backreference"),
        (r"^web(?!-admin)", "lookahead or lookbehind"),
        (r"(?<=x)web", "lookahead or lookbehind"),
        (r"^a++$", "possessive"),
        (r"^(?>a+)$", "atomic"),
        (r"^a{1000}$", "more than 100 times"),
        (r"a{99999999999}", "not a regular expression"),
        (r"(", "not a regular expression"),
    ],
)
def test_patterns_that_need_backtracking_are_refused_at_start(pattern, why):
    with pytest.raises(ConfigurationError) as error:
        DjangoDbCheck("django_db", {}, [{"postgres": {}, "applications": {"exclude": ["ok", pattern]}}])
    assert "`applications.exclude[1]`" in str(error.value) and why in str(error.value)


PATTERNS = [
    "^web", "admin$", "^(a+)+$", "(a|a)*b", r"^celery-worker-\d+$", "(?i)^WeB", "[^a-c]x", r"\bfoo\b", "a{2,4}b",
    "x*?y", "^$", "", "a|b|cd", "(?s).x", r"\Aab\Z", r"[\w-]+@", "(?i)[A-C]z", "^(web|api)-[0-9]{1,3}$", "a.*b.*c",
    r"[^\W\d]", r"\S\s", "é", r"(?a)\w+$", "^(a|ab)*c$", "(ab){2,}", "a{0}", "(a*)*b", r"(?m)^b$", "(?x) a b # c",
    r"[.]\.", "(?i:A)a", "[a-]z", r"\d\D\W",
]  # fmt: skip
NAMES = st.text(alphabet="abcABxyz-_01 é\n!.@Wweb", max_size=16)


@settings(max_examples=300, derandomize=True, deadline=None, database=None)
@given(st.sampled_from(PATTERNS), NAMES)
def test_name_patterns_match_as_python_does(pattern, name):
    assert compile_name_pattern(pattern).search(name) == (re.search(pattern, name) is not None)
