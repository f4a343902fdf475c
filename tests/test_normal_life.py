"""A site's normal life is no fault: quiet hours, a killed worker, other monitors, a restart; a failure told
twice by PostgreSQL counts once, and a finding from errors holds while its window lasts."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import psycopg
from datadog_checks.base import AgentCheck

from datadog_checks.django_db import DjangoDbCheck
from django_db_tools.sandbox import Sandbox
from django_db_tools.webapp.harness import Webapp

from .conftest import APP_PASSWORD, looping, metric_values, run_health
from .test_mysql import app_connect, django_app, mysql_instance

__all__ = ["django_app"]  # the MySQL tests' fixture, used here too

LEAK = 2  # seconds: the leak threshold of these tests


@contextmanager
def traffic(*apps: Webapp, concurrency: int = 4) -> Iterator[None]:
    """Requests to every app, ``concurrency`` at a time each, until the block ends."""
    with ExitStack() as stack:
        for app in apps:
            stack.enter_context(looping(lambda app=app: app.get("/query/", timeout=10), concurrency))
        yield


def kept_connection(port: int, app: str) -> psycopg.Connection:
    """A connection of the application that queries once and is then left alone: a leak."""
    conn = psycopg.connect(
        host="127.0.0.1", port=port, user="app", password=APP_PASSWORD, dbname="appdb", application_name=app,
        autocommit=True, connect_timeout=5,
    )  # fmt: skip
    conn.execute("SELECT 1")
    return conn


def leaks(aggregator) -> dict[str, float]:
    found = {}
    for name, tag in (
        ("postgres.leaked_connections", "app:direct-site"),
        ("pgbouncer.leaked_clients", "app:pooled-site"),
    ):
        found[tag] = sum(metric_values(aggregator, f"django_db.{name}", tag))
    return found


def test_a_site_gone_quiet_is_no_leak_and_the_leak_beside_it_is_counted_exactly(
    aggregator, dd_run_check, sandbox: Sandbox, webapps, caplog
):
    """Two sites under gunicorn (2 workers x 2 threads, CONN_MAX_AGE 60), one straight to PostgreSQL, one through
    PgBouncer in transaction mode, each with a connection of its own name left idle from the start. During the
    traffic, and after it stopped for longer than the leak threshold, only that one connection of each is a leak;
    once it is closed, the quiet sites are said to be quiet, and nothing is a leak."""
    caplog.set_level(logging.INFO)
    direct = webapps(app_name="direct-site", workers=2, threads=2, conn_max_age=60)
    pooled = webapps(through="pgbouncer", app_name="pooled-site", workers=2, threads=2, conn_max_age=60)
    kept = [
        kept_connection(sandbox.postgres.port, "direct-site"),
        kept_connection(sandbox.pgbouncer.port, "pooled-site"),
    ]
    instance = {
        **sandbox.instance(),
        "leak_idle_seconds": LEAK,
        "conn_max_age": 60,
        "applications": {"include": ["-site$"]},
    }
    check = DjangoDbCheck("django_db", {}, [instance])
    try:
        with traffic(direct, pooled):
            # PgBouncer's times are whole seconds: a site under traffic may look quiet for up to about two, so the
            # kept connection waits past the threshold by more than that before it must be a leak.
            for _ in range(6):
                run_health(aggregator, dd_run_check, check)
                time.sleep(0.7)
            _, text = run_health(aggregator, dd_run_check, check)
            assert leaks(aggregator) == {"app:direct-site": 1, "app:pooled-site": 1}, text
        time.sleep(LEAK + 1.2)  # every connection the sites keep is idle past the threshold now
        _, text = run_health(aggregator, dd_run_check, check)
        assert leaks(aggregator) == {"app:direct-site": 1, "app:pooled-site": 1}, text
        assert "1 connections of app=direct-site idle for over 2 s (leaked)" in text
        assert "1 client connection of app=pooled-site held at PgBouncer idle for over 2 s (leaked" in text
        assert "gunicorn" not in text
        for conn in kept:
            conn.close()
        time.sleep(0.5)
        _status, text = run_health(aggregator, dd_run_check, check)
        assert leaks(aggregator) == {"app:direct-site": 0, "app:pooled-site": 0}, text
        assert "leaked" not in text
        said = caplog.text
        assert (
            "app=direct-site quiet for " in said and " kept idle until its next request (CONN_MAX_AGE), no leak" in said
        )
        assert "app=pooled-site quiet for " in said and " at PgBouncer kept idle until its next request" in said
    finally:
        check.cancel()
        for conn in kept:
            conn.close()


def test_a_killed_worker_is_no_database_fault(aggregator, dd_run_check, sandbox: Sandbox, webapps):
    """gunicorn says a worker killed with SIGKILL was "Perhaps out of memory?": no memory signature, no CRITICAL."""
    app = webapps(app_name="killed-site", workers=2, threads=2, conn_max_age=60)
    app.drive("/query/", count=8, concurrency=4)
    instance = {**sandbox.instance(), "log_files": [str(app.gunicorn_log)]}
    check = DjangoDbCheck("django_db", {}, [instance])
    run_health(aggregator, dd_run_check, check)
    workers = [int(pid) for pid in os.popen(f"pgrep -P {app.proc.pid}").read().split()]  # noqa: S605 - our own
    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + 15
    while "was sent SIGKILL" not in app.output() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "Perhaps out of memory?" in app.output()
    status, text = run_health(aggregator, dd_run_check, check)
    check.cancel()
    assert status != AgentCheck.CRITICAL, text
    assert "memory_quota" not in text
    assert not metric_values(aggregator, "django_db.errors", "signature:memory_quota")


def test_another_monitor_is_never_named(aggregator, dd_run_check, sandbox: Sandbox):
    """A second instance of the check on the same servers (its role has no timeouts, its connection idles between
    runs): no timeout finding and no leak names it."""
    instance = {**sandbox.instance(), "leak_idle_seconds": 0.5}
    other = DjangoDbCheck("django_db", {}, [instance])
    check = DjangoDbCheck("django_db", {}, [instance])
    try:
        dd_run_check(other)
        time.sleep(1)
        run_health(aggregator, dd_run_check, check)
        messages = [sc.message for name in aggregator._service_checks for sc in aggregator.service_checks(name)]
        assert aggregator.service_checks("django_db.config_alignment")
        assert not [m for m in messages if "datadog@" in m or "datadog-django-db" in m], messages
        assert not sum(metric_values(aggregator, "django_db.postgres.leaked_connections", "app:datadog-django-db"))
    finally:
        other.cancel()
        check.cancel()


def test_a_restart_of_pgbouncer_is_named_once_with_advice_that_fits(
    aggregator, dd_run_check, sandbox: Sandbox, webapps
):
    """PgBouncer restarted under a site that keeps its connections: the requests that met a broken connection fail;
    the message names the restart once, and the advice for those errors is CONN_HEALTH_CHECKS."""
    app = webapps(through="pgbouncer", app_name="restart-site", workers=1, threads=2, conn_max_age=60)
    app.drive("/query/", count=8, concurrency=2)
    instance = {**sandbox.instance(), "log_files": [str(app.log_file)], "applications": {"include": ["^restart-"]}}
    check = DjangoDbCheck("django_db", {}, [instance])
    try:
        run_health(aggregator, dd_run_check, check)
        sandbox.pgbouncer.stop()
        sandbox.pgbouncer.start()
        replies = app.drive("/query/", count=8, concurrency=2)
        assert any(r.status == 500 for r in replies)
        _, text = run_health(aggregator, dd_run_check, check)
        port = sandbox.pgbouncer.port
        assert text.count(f"PgBouncer 127.0.0.1:{port} restarted (") == 1, text
        [found] = [part for part in text.split("; ") if "server_closed seen" in part]
        assert f"PgBouncer 127.0.0.1:{port} restarted " in found and "CONN_HEALTH_CHECKS = True" in found, found
        assert "align CONN_MAX_AGE" not in found
        _status, text = run_health(aggregator, dd_run_check, check)
        assert f"PgBouncer 127.0.0.1:{port} restarted (" not in text  # said once
        assert "server_closed seen " in text and "CONN_HEALTH_CHECKS = True" in text  # held, with its advice
    finally:
        check.cancel()


def test_a_quiet_site_on_mariadb_is_no_leak_and_the_leak_beside_it_is(
    aggregator, dd_run_check, mariadb, django_app, caplog
):
    """The Django application on MariaDB (worker threads that keep their connections, CONN_MAX_AGE 60) and a
    connection of the same user left idle: during the traffic and after it, that one is the leak."""
    caplog.set_level(logging.INFO)
    app = django_app(conn_max_age=60, threads=4)
    leaky = app_connect(mariadb)
    leaky.cursor().execute("SELECT 1")
    check = DjangoDbCheck("django_db", {}, [mysql_instance(mariadb, leak_idle_seconds=LEAK)])
    try:
        with looping(lambda: app.get("/items"), 4):
            for _ in range(4):
                run_health(aggregator, dd_run_check, check)
                time.sleep(0.7)
            _, text = run_health(aggregator, dd_run_check, check)
            assert sum(metric_values(aggregator, "django_db.mysql.leaked_connections", "user:app")) == 1, text
        time.sleep(LEAK + 1.2)
        _, text = run_health(aggregator, dd_run_check, check)
        assert sum(metric_values(aggregator, "django_db.mysql.leaked_connections", "user:app")) == 1, text
        assert "1 MySQL connections idle for over 2 s (leaked): user=app 1" in text
        leaky.close()
        time.sleep(0.5)
        _status, text = run_health(aggregator, dd_run_check, check)
        assert sum(metric_values(aggregator, "django_db.mysql.leaked_connections", "user:app")) == 0, text
        assert "leaked" not in text
        assert "user=app quiet for " in caplog.text
    finally:
        if leaky.open:
            leaky.close()
        check.cancel()


def test_which_threshold_wins_is_said_at_start(caplog, sandbox: Sandbox, mariadb):
    """A profile whose CONN_MAX_AGE gives its applications another leak threshold than leak_idle_seconds, and
    budgets on MySQL, which names no application, are said when the check starts."""
    caplog.set_level(logging.INFO)
    apps = [{"match": "^bakery$", "conn_max_age": 60, "max_connections": 2}, {"match": "^admin$", "max_connections": 1}]
    DjangoDbCheck("django_db", {}, [{**sandbox.instance(), "leak_idle_seconds": 120, "apps": apps}])
    said = caplog.text
    assert (
        "apps profile bakery: its applications' leak threshold is 300 s (from its conn_max_age=60), not the "
        "instance's leak_idle_seconds=120 s" in said
    )
    assert "apps profile admin:" not in said  # it keeps the instance's
    DjangoDbCheck("django_db", {}, [mysql_instance(mariadb, apps=apps)])
    assert "apps profiles bakery, admin: MySQL names no application" in caplog.text


def test_a_pgbouncer_down_at_the_first_run_is_no_restart_when_it_comes(
    aggregator, dd_run_check, sandbox: Sandbox, caplog
):
    caplog.set_level(logging.INFO)
    sandbox.pgbouncer.stop()
    check = DjangoDbCheck("django_db", {}, [sandbox.instance()])
    try:
        run_health(aggregator, dd_run_check, check)
        aggregator.assert_service_check("django_db.pgbouncer.can_connect", AgentCheck.CRITICAL)
    finally:
        sandbox.pgbouncer.start()
    try:
        run_health(aggregator, dd_run_check, check)
        aggregator.assert_service_check("django_db.pgbouncer.can_connect", AgentCheck.OK)
        assert " restarted (" not in caplog.text
    finally:
        check.cancel()
