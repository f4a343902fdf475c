"""What transaction pooling breaks, without servers: the application's name in PostgreSQL's log lines, and advice
that fits the PgBouncer the run read (its pool modes, version and max_prepared_statements)."""

from __future__ import annotations

from collections import Counter

import pytest

from datadog_checks.django_db.evaluate.health import signature_findings
from datadog_checks.django_db.evaluate.log_prefix import app_finder
from datadog_checks.django_db.evaluate.session_state import CURSOR, PREPARED, advice
from datadog_checks.django_db.evaluate.signatures import LogRecords
from datadog_checks.django_db.records import PgbClientGroup, PgbClients, PgbConfig, PgbPool, PgbSnapshot

CURSOR_ERROR = 'ERROR:  cursor "_django_curs_140462479124160_sync_5" does not exist'


@pytest.mark.parametrize(
    "prefix, head, app",
    [
        ("%m [%p] %q%u@%d/%a ", "2026-12-05 02:10:13.587 UTC [16455] app@appdb/cursor-web ", "cursor-web"),
        ("%m [%p] %q%u@%d/%a ", "2026-12-05 02:10:13.587 UTC [16455] app@appdb/[unknown] ", ""),
        (
            "%t [%p]: user=%u,db=%d,app=%a,client=%h ",
            "2026-12-05 02:10:13 UTC [9]: user=app,db=shop,app=web,client=10.0.0.7 ",
            "web",
        ),
        ("%-12a|%u ", "web         |app ", "web"),
        # a name holding the prefix's separators and a severity's words is still read whole
        ("%m [%p] %q%u@%d/%a ", "2026-12-05 02:10:13.587 UTC [16455] app@appdb/a b@c/ERROR:  d ", "a b@c/ERROR:  d"),
    ],
)
def test_the_application_is_read_where_the_prefix_carries_it(prefix, head, app):
    app_of = app_finder(prefix)
    assert app_of is not None
    assert app_of(head + CURSOR_ERROR) == app


def test_no_application_without_percent_a_or_off_the_prefixs_shape():
    assert app_finder("%m [%p] ") is None
    app_of = app_finder("%m [%p] %q%u@%d/%a ")
    assert app_of is not None
    # Django's own log and a traceback's exception line are not PostgreSQL's lines
    assert app_of("2026-12-05 02:10:14,624 ERROR django.request 16462: Internal Server Error: /iterate/") is None
    assert app_of('psycopg.errors.InvalidCursorName: cursor "_django_curs_1_sync_5" does not exist') is None


def test_each_record_names_its_application_once():
    app_of = app_finder("%m [%p] %q%u@%d/%a ")
    records = LogRecords(app_of)
    line = "2026-12-05 02:10:13.587 UTC [16455] app@appdb/{} ERROR:  {}"
    statement = '2026-12-05 02:10:13.587 UTC [16455] app@appdb/{} STATEMENT:  FETCH FORWARD 50 FROM "_django_curs_1"'
    lines = [
        line.format("web", 'cursor "_django_curs_1" does not exist'),
        statement.format("web"),
        line.format("web", 'portal "_django_curs_2" does not exist'),
        line.format("jobs", 'prepared statement "_pg3_0" already exists'),
        'psycopg.errors.InvalidCursorName: cursor "_django_curs_3" does not exist',
    ]
    assert records.feed(lines) == {CURSOR: 3, PREPARED: 1}
    assert records.apps == {(CURSOR, "web"): 2, (PREPARED, "jobs"): 1}
    assert records.feed([]) == {} and records.apps == {}


def pgbouncer(modes: tuple[str, ...], version: str | None = "1.18.0", **config: object) -> PgbSnapshot:
    pools = tuple(PgbPool(f"db{n}", "app", mode, 20) for n, mode in enumerate(modes))
    return PgbSnapshot(pools, (), (), {}, PgbConfig(**config), version)  # type: ignore[arg-type]


def test_cursor_advice_names_the_pool_mode_and_the_setting():
    text = advice(CURSOR, pgbouncer(("transaction", "session")))
    assert "(pools in transaction mode: db0/app transaction)" in text
    assert text.endswith("Set DISABLE_SERVER_SIDE_CURSORS = True in the DATABASES entry that goes through PgBouncer")
    # no PgBouncer section: the likely cause is named all the same
    assert "most likely a pooler in transaction mode is in front of PostgreSQL" in advice(CURSOR, None)
    assert "DISABLE_SERVER_SIDE_CURSORS = True" in advice(CURSOR, None)
    # PgBouncer in session mode keeps cursors: another pooler is to blame, not a mode to change here
    session = advice(CURSOR, pgbouncer(("session",)))
    assert "pools in session mode only" in session and "another pooler in transaction mode" in session


def test_the_pools_named_are_those_of_the_applications_the_log_named():
    pools = (PgbPool("shop", "app", "transaction", 20), PgbPool("reports", "etl", "transaction", 5))
    pools += (PgbPool("admin", "app", "session", 5),)
    clients = PgbClients(
        (PgbClientGroup("reports", "etl", "report-jobs", "active", "10.0.0.9", "", False, 4),
         PgbClientGroup("shop", "app", "web", "active", "10.0.0.7", "", True, 8)),
        "", True,
    )  # fmt: skip
    pgb = PgbSnapshot(pools, (), (), {}, PgbConfig(), "1.18.0", clients=clients)
    assert "(pools in transaction mode: reports/etl transaction)" in advice(CURSOR, pgb, ["report-jobs"])
    # an application PgBouncer shows no client of now: every pool, as without a name
    every = "(pools in transaction mode: shop/app transaction, reports/etl transaction)"
    assert every in advice(CURSOR, pgb, ["gone"]) and every in advice(CURSOR, pgb)


def test_prepared_statement_advice_fits_the_version_and_max_prepared_statements():
    old = advice(PREPARED, pgbouncer(("transaction",), "1.18.0"))
    assert "PgBouncer 1.18.0 cannot keep prepared statements" in old
    assert "remove server_side_binding and prepare_threshold" in old and "upgrade to PgBouncer 1.21" in old
    off = advice(PREPARED, pgbouncer(("transaction",), "1.24.1", max_prepared_statements=0.0))
    assert "max_prepared_statements above 0, and it is 0: set it" in off
    on = advice(PREPARED, pgbouncer(("transaction",), "1.24.1", max_prepared_statements=200.0))
    assert "keeps protocol-level prepared statements already (max_prepared_statements = 200)" in on
    assert "set it" not in on  # never ask for what is set
    assert "max_prepared_statements above 0" in advice(PREPARED, None)
    empty = advice(PREPARED, pgbouncer((), "1.18.0", pool_mode="transaction"))
    assert "(pool_mode = transaction, no pools yet)" in empty


def test_the_finding_names_the_applications_the_log_named():
    seen = [(CURSOR, "log", "log_file:/var/log/postgresql.log")] * 3 + [(CURSOR, "log", "log_file:/app/django.log")]
    [finding] = signature_findings(seen, None, pgbouncer(("transaction",)), {CURSOR: Counter({"web": 3})})
    assert (finding.code, finding.figure) == (CURSOR, 3)
    assert finding.text == (
        "server_side_cursor_lost seen (1 in django.log, 3 in postgresql.log; a failure can show in each log; app=web 3)"
    )
    assert finding.advice.startswith("A server-side cursor was read on another server connection")
