"""The MySQL evaluation without a server: metrics, folding, findings, churn, alignment and signatures."""

from __future__ import annotations

from dataclasses import replace

import pytest

from datadog_checks.django_db import config
from datadog_checks.django_db.evaluate.churn import Churn
from datadog_checks.django_db.evaluate.model import Status, Subject
from datadog_checks.django_db.evaluate.mysql import (
    MysqlHistory,
    applied_wait_timeout,
    dimensions,
    mysql_alignment,
    mysql_findings,
    mysql_metrics,
)
from datadog_checks.django_db.evaluate.signatures import classify, count_log_lines
from datadog_checks.django_db.records import MysqlSnapshot, MysqlStatus, MysqlVariables, ProcessGroup
from datadog_checks.django_db.sources.mysql import processlist_table, state_of

SERVER = "mysql_server:db.internal:3306"


def settings(**options: object) -> config.Settings:
    return config.parse({"mysql": {"host": "db.internal", "port": 3306}, **options})


def snapshot(
    groups: tuple[ProcessGroup, ...] = (),
    threads_connected: int = 1,
    max_connections: int = 100,
    wait_timeout: int = 28800,
    interactive_timeout: int = 28800,
    init_connect: str = "",
    uptime: float = 1000,
    connections: int = 50,
    sees_all_threads: bool = True,
) -> MysqlSnapshot:
    return MysqlSnapshot(
        MysqlVariables("10.11.6-MariaDB", max_connections, wait_timeout, interactive_timeout, init_connect),
        MysqlStatus(uptime, threads_connected, 2, 40, 3, 4, connections),
        groups,
        new_connection=False,
        sees_all_threads=sees_all_threads,
    )


def values(metrics, name, *tags):
    return [m.value for m in metrics if m.name == name and set(tags) <= set(m.tags)]


def test_group_by_maps_app_and_client_addr_to_the_client_host():
    assert dimensions(("db", "user", "app")) == ("db", "user", "client_host")
    assert dimensions(("app", "client_addr")) == ("client_host",)
    assert dimensions(()) == ()


def test_metrics_by_state_and_dimensions_and_the_server_figures():
    groups = (
        ProcessGroup("idle", "app", "appdb", "10.0.0.7", 3, leaked=1, max_idle=700),
        ProcessGroup("idle_in_transaction", "app", "appdb", "10.0.0.7", 1, max_idle=40, max_transaction_age=45),
        ProcessGroup("active", "worker", "appdb", "10.0.0.8", 2),
    )
    metrics, folded = mysql_metrics(snapshot(groups, threads_connected=7, max_connections=10), settings())
    assert folded == {}
    base = (SERVER, "db:appdb")
    idle_app = (*base, "state:idle", "user:app", "client_host:10.0.0.7")
    assert values(metrics, "django_db.mysql.connections", *idle_app) == [3]
    assert values(metrics, "django_db.mysql.connections", "state:active", "user:worker") == [2]
    assert values(metrics, "django_db.mysql.connection_utilization", SERVER) == [0.7]
    assert values(metrics, "django_db.mysql.connections_available", SERVER) == [3]
    assert values(metrics, "django_db.mysql.leaked_connections", *base, "user:app") == [1]
    assert values(metrics, "django_db.mysql.idle.max_age", *base, "user:app") == [700]
    assert values(metrics, "django_db.mysql.transaction.max_age", *base, "user:app") == [45]
    assert values(metrics, "db.client.connections.usage", "state:idle", "pool.name:db.internal:3306/appdb") == [3]
    assert values(metrics, "db.client.connections.usage", "state:used", "pool.name:db.internal:3306/appdb") == [3]
    rates = {m.name for m in metrics if m.kind == "rate"}
    assert rates == {
        "django_db.mysql.aborted_clients",
        "django_db.mysql.aborted_connects",
        "django_db.mysql.connections_opened",
    }


def test_without_otel_and_without_the_client_host():
    groups = (ProcessGroup("idle", "app", "appdb", "10.0.0.7", 3),)
    metrics, _ = mysql_metrics(snapshot(groups), settings(emit_otel_metrics=False, group_by=["db", "user"]))
    assert not values(metrics, "db.client.connections.usage")
    (connections,) = [m for m in metrics if m.name == "django_db.mysql.connections"]
    assert not any(tag.startswith("client_host:") for tag in connections.tags)


def test_client_hosts_past_the_limit_fold_into_other():
    groups = tuple(ProcessGroup("idle", "app", "appdb", f"10.0.0.{n}", n) for n in range(1, 5))
    metrics, folded = mysql_metrics(snapshot(groups), settings(max_tag_values=2))
    assert folded == {"client_host": ["10.0.0.1", "10.0.0.2"]}
    assert values(metrics, "django_db.mysql.connections", "client_host:other") == [3]
    assert values(metrics, "django_db.mysql.connections", "client_host:10.0.0.4") == [4]


def test_utilisation_findings_and_the_extra_admin_connection():
    groups = (ProcessGroup("idle", "app", "appdb", "10.0.0.7", 9),)
    (full,) = mysql_findings(snapshot(groups, threads_connected=10, max_connections=10), settings(), None)
    assert (full.code, full.status, full.figure, full.threshold) == ("utilization", Status.CRITICAL, 1.0, 0.9)
    assert full.line() == "CRITICAL: 10 of 10 MySQL connections in use (100% of max_connections; most: user=app 9)"
    (extra,) = mysql_findings(snapshot(groups, threads_connected=11, max_connections=10), settings(), None)
    assert extra.status == Status.CRITICAL
    assert extra.text.startswith("11 MySQL connections for max_connections=10 (110%; most: user=app 9)")
    assert "only one more, for SUPER / CONNECTION_ADMIN, is admitted" in extra.text
    (calm,) = mysql_findings(snapshot(groups, threads_connected=10), settings(), None)
    assert calm.status == Status.OK


def test_leaks_by_user_long_transactions_churn_and_a_missing_privilege():
    groups = (
        ProcessGroup("idle", "app", "appdb", "10.0.0.7", 5, leaked=3),
        ProcessGroup("idle", "reports", "appdb", "10.0.0.9", 1, leaked=1),
        ProcessGroup("idle_in_transaction", "app", "appdb", "10.0.0.7", 1, max_transaction_age=400),
    )
    churn = Churn(per_minute=150.0, seconds=75.0, opened=190, growth=2)
    found = mysql_findings(snapshot(groups, threads_connected=8, sees_all_threads=False), settings(), churn)
    codes = {f.code: f for f in found}
    assert len(codes) == len(found)
    leaked = codes["leaked_connections"]
    assert (leaked.status, leaked.figure) == (Status.WARNING, 4)
    assert leaked.subjects == (Subject(("user:app",), 3), Subject(("user:reports",), 1))
    assert codes["idle_in_transaction"].status == Status.OK
    oldest = codes["long_transaction"]
    assert (oldest.status, oldest.figure, oldest.threshold) == (Status.CRITICAL, 400, 300)
    assert oldest.subjects == (Subject(("user:app", "db:appdb")),)
    assert (codes["connection_churn"].status, codes["connection_churn"].figure) == (Status.WARNING, 150.0)
    assert codes["monitoring_role_blind"].advice == "GRANT PROCESS ON *.* TO 'datadog'@'%'"
    texts = {f.line() for f in found}
    assert "WARNING: 4 MySQL connections idle for over 300 s (leaked): user=app 3, user=reports 1" in texts
    oldest_text = "the oldest MySQL transaction, of user=app on db=appdb from 10.0.0.7, has been open for 400 s"
    assert f"CRITICAL: {oldest_text}" in texts
    assert (
        "WARNING: the monitoring user sees only its own MySQL threads: GRANT PROCESS ON *.* TO 'datadog'@'%'" in texts
    )


def test_churn_over_a_minute_on_the_server_clock_and_none_after_a_restart():
    history = MysqlHistory()

    def churn(uptime, connections, threads=1, aborted=4):
        status = MysqlStatus(uptime, threads, 2, 40, 3, aborted, connections)
        return history.churn(replace(snapshot(), status=status))

    assert churn(100, 10) is None
    assert churn(130, 70) is None  # less than a minute of history: no verdict
    assert churn(160, 130).per_minute == 120  # 120 opened in 60 s, none kept
    assert churn(5, 3) is None  # restarted
    assert churn(35, 13, threads=11) is None
    # 40 threads that connect at once and stay: a burst, no churn; failed attempts are no connections
    assert churn(65, 48, threads=41, aborted=9).per_minute == 0
    assert churn(100, 78, threads=41, aborted=9).per_minute == pytest.approx(30 * 60 / 65)


@pytest.mark.parametrize(
    "conn_max_age, wait_timeout, init_connect, expected",
    [
        (60, 28800, "", None),
        (0, 5, "", None),  # Django closes after each request
        (60, 60, "", None),
        (600, 300, "", "conn_max_age=600 s is longer than MySQL's wait_timeout=300 s for user app"),
        (None, 28800, "", "conn_max_age=None (persistent) is longer than MySQL's wait_timeout=28800 s"),
        (600, 28800, "SET SESSION wait_timeout = 120", "wait_timeout=120 s set by init_connect for user app"),
        (60, 28800, "SET SESSION wait_timeout = 120", None),
    ],
)
def test_conn_max_age_against_wait_timeout(conn_max_age, wait_timeout, init_connect, expected):
    groups = (ProcessGroup("idle", "app", "appdb", "10.0.0.7", 2), ProcessGroup("active", "datadog", "", "", 1))
    s = settings(conn_max_age=conn_max_age)
    failures = mysql_alignment(s, snapshot(groups, wait_timeout=wait_timeout, init_connect=init_connect))
    if expected is None:
        assert failures == []
    else:
        (failure,) = failures
        assert failure.code == "conn_max_age_over_wait_timeout"
        assert (failure.figure, failure.threshold) == (conn_max_age, int(expected.split("wait_timeout=")[1].split()[0]))
        assert expected in failure.text
        assert "(2006, 'MySQL server has gone away')" in failure.advice
        assert "datadog" not in failure.sentence()  # the monitoring user is no application


def test_an_app_profile_with_its_own_conn_max_age_is_checked_too():
    s = settings(conn_max_age=60, apps=[{"match": "^reports", "name": "reports", "conn_max_age": None}])
    (failure,) = mysql_alignment(s, snapshot(wait_timeout=300))
    assert failure.subjects == (Subject(("app:reports",)),)
    assert failure.text.startswith("app=reports: conn_max_age=None (persistent) is longer than MySQL's wait_timeout")
    assert mysql_alignment(settings(conn_max_age=60, apps=[{"match": "^web"}]), snapshot(wait_timeout=300)) == []


def test_interactive_timeout_is_named_only_beside_a_wait_timeout_failure():
    short_interactive = snapshot(wait_timeout=300, interactive_timeout=100)
    (failure,) = mysql_alignment(settings(conn_max_age=600), short_interactive)
    assert "interactive_timeout=100 s, for clients that connect as interactive, is shorter too" in failure.advice
    # Django connects as a non-interactive client: interactive_timeout alone is no failure.
    assert mysql_alignment(settings(conn_max_age=200), snapshot(wait_timeout=300, interactive_timeout=100)) == []


def test_init_connect_wait_timeout():
    variables = MysqlVariables("8.0.36", 100, 28800, 28800, "SET NAMES utf8mb4; SET wait_timeout=90")
    assert applied_wait_timeout(variables) == (90, "init_connect")
    assert applied_wait_timeout(MysqlVariables("8.0.36", 100, 600, 28800)) == (600, "global")


@pytest.mark.parametrize(
    "version, performance_schema, table",
    [
        ("10.11.6-MariaDB-0+deb12u1", "ON", "information_schema.PROCESSLIST"),
        ("8.0.36", "ON", "performance_schema.processlist"),
        ("8.0.22-log", "ON", "performance_schema.processlist"),
        ("8.0.21", "ON", "information_schema.PROCESSLIST"),
        ("8.0.36", "OFF", "information_schema.PROCESSLIST"),
        ("5.7.44", "ON", "information_schema.PROCESSLIST"),
    ],
)
def test_processlist_table(version, performance_schema, table):
    assert processlist_table(version, performance_schema) == table


def test_thread_states():
    assert state_of("Sleep", False) == "idle"
    assert state_of("Sleep", True) == "idle_in_transaction"
    assert state_of("Query", True) == "active"
    assert state_of("Binlog Dump", False) == "binlog_dump"


@pytest.mark.parametrize(
    "text, errno, name",
    [
        ("(1040, 'Too many connections')", 1040, "mysql_too_many_connections"),
        ("django.db.utils.OperationalError: (1040, 'Too many connections')", None, "mysql_too_many_connections"),
        ("ERROR 1040 (HY000): Too many connections", None, "mysql_too_many_connections"),
        ("(2006, 'MySQL server has gone away')", 2006, "mysql_server_gone"),
        ("MySQLdb.OperationalError: (2006, 'MySQL server has gone away')", None, "mysql_server_gone"),
        ("(2013, 'Lost connection to MySQL server during query')", 2013, "mysql_server_gone"),
        ("OperationalError: (2013, 'Lost connection to MySQL server during query')", None, "mysql_server_gone"),
        ("(1927, 'Connection was killed')", 1927, "mysql_server_gone"),  # MariaDB 10.5 shutting down
        ("django.db.utils.OperationalError: (1927, 'Connection was killed')", None, "mysql_server_gone"),
        ("(1045, \"Access denied for user 'app'@'10.0.0.7' (using password: YES)\")", 1045, "mysql_access_denied"),
        ("2026-11-21 8:43:35 6 [Warning] Access denied for user 'app'@'127.0.0.1' (using password: YES)", None,
         "mysql_access_denied"),
        ("(1049, \"Unknown database 'shop'\")", 1049, "mysql_unknown_database"),
        ("django.db.utils.OperationalError: (1049, \"Unknown database 'shop'\")", None, "mysql_unknown_database"),
        ("(2003, \"Can't connect to MySQL server on 'db' ([Errno 111] Connection refused)\")", 2003,
         "mysql_cannot_connect"),
        ("OperationalError: (2003, \"Can't connect to MySQL server on 'db' (timed out)\")", None,
         "mysql_cannot_connect"),
    ],
)  # fmt: skip
def test_mysql_signatures(text, errno, name):
    assert classify(text, None, errno).name == name
    assert classify(text).name == name  # from a log line: the text alone


def test_postgres_texts_keep_their_signatures():
    assert classify('FATAL:  too many connections for role "app"', "53300").name == "too_many_clients"
    assert classify("FATAL:  sorry, too many clients already").name == "too_many_clients"
    assert classify("server closed the connection unexpectedly").name == "server_closed"


def test_a_chained_traceback_counts_once():
    traceback = """\
2026-11-21 08:50:01 ERROR django.request: Internal Server Error: /hold
Traceback (most recent call last):
pymysql.err.OperationalError: (1040, 'Too many connections')

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
django.db.utils.OperationalError: (1040, 'Too many connections')
2026-11-21 08:50:02 ERROR django.request: Internal Server Error: /hold
pymysql.err.OperationalError: (1040, 'Too many connections')
"""
    assert count_log_lines(traceback.splitlines()) == {"mysql_too_many_connections": 2}
