"""With report_leak_queries, a suspect's last query shows no literal: comments, dollar quotes,
E'' strings and text cut short by track_activity_query_size included."""

from __future__ import annotations

import time

import pytest

from datadog_checks.django_db import DjangoDbCheck
from datadog_checks.django_db.evaluate.queries import QUERY_CUT, normalize_query
from django_db_tools.sandbox import Sandbox

SECRET = "alice-secret"

QUERIES = {
    "comment": f"SELECT id FROM items /* customer {SECRET} */ WHERE id = 1 -- {SECRET}\n",
    "nested-comment": f"SELECT id FROM items /* a /* b */ {SECRET} */ WHERE id = 1",
    "dollar-quoted": f"SELECT $q1${SECRET}$q1$, $$it's {SECRET}$$",
    "escape-string": f"SELECT E'it\\'s {SECRET}', e'\\\\', '{SECRET}'",
    # pg_stat_activity keeps the first 1023 bytes (track_activity_query_size): the literal loses its end.
    "cut-short": "SELECT 1," + " " * 1000 + f"'{SECRET}" + "x" * 100 + "'",
}


@pytest.mark.parametrize("case", sorted(QUERIES))
def test_a_leak_suspects_last_query_shows_no_literal(aggregator, dd_run_check, sandbox, clients, case):
    app = f"leaky-{case}"
    clients.connect(app=app).execute(QUERIES[case])
    time.sleep(1.2)
    instance = {
        "postgres": sandbox.postgres.instance(Sandbox.MONITOR_USER, Sandbox.MONITOR_PASSWORD),
        "leak_idle_seconds": 1,
        "applications": {"include": [f"^{app}$"]},
        "report_leak_queries": True,
    }
    check = DjangoDbCheck("django_db", {}, [instance])
    dd_run_check(check)
    check.cancel()
    [status] = aggregator.service_checks("django_db.connection_health")
    assert f"suspects: app={app}" in status.message and "last query: SELECT" in status.message, status.message
    assert SECRET not in status.message and "xxx" not in status.message, status.message


@pytest.mark.parametrize(
    "query, expected",
    [
        ("SELECT 1 /* open comment with " + SECRET, "SELECT ?"),
        ("SELECT $body$ open dollar body " + SECRET, "SELECT ?"),
        ("SELECT 'open string " + SECRET, "SELECT ?"),
        ("SELECT E'open escape \\' string " + SECRET, "SELECT ?"),
        (
            "SELECT x-1, f(-2), $1, U&'d\\0061t', 0x1F, 1_000, B'101', X'1F', n'x'",
            "SELECT x-?, f(?), $1, ?, ?, ?, ?, ?, ?",
        ),
        ('SELECT "we""ird" FROM t WHERE a = \'x\'', 'SELECT "we""ird" FROM t WHERE a = ?'),
    ],
)
def test_normalize_query_closes_every_literal(query, expected):
    assert normalize_query(query) == expected


def test_a_long_query_is_cut():
    text = normalize_query("SELECT " + "col, " * 10_000 + f"'{SECRET}'")
    assert len(text) == QUERY_CUT and text.endswith("…") and SECRET not in text
