"""The check's own connections broken between runs: a server that came back is no page, one really down is.

A sandbox of its own, since its servers are restarted and stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import psycopg
import pytest
from datadog_checks.base import AgentCheck

from datadog_checks.django_db import DjangoDbCheck
from django_db_tools.sandbox import SUPERUSER, Sandbox

from .conftest import metric_values, timed_critical_run

POSTGRES = "django_db.postgres.can_connect"
PGBOUNCER = "django_db.pgbouncer.can_connect"
HEALTH = "django_db.connection_health"


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    with Sandbox(max_connections=30) as box:
        yield box


@pytest.fixture
def check(box: Sandbox) -> Iterator[DjangoDbCheck]:
    instance = box.instance()
    for section in ("postgres", "pgbouncer"):
        instance[section].update(connect_timeout=2, query_timeout=1)
    # Runs a moment apart make any new session look like heavy churn: not what these tests are about.
    instance["thresholds"] = {"churn_per_minute": {"warning": 10**9}}
    check = DjangoDbCheck("django_db", {}, [instance])
    yield check
    check.cancel()


def errors(aggregator) -> dict[tuple[str, str], float]:
    """django_db.errors by (signature, source)."""
    found: dict[tuple[str, str], float] = {}
    for metric in aggregator.metrics("django_db.errors"):
        tags = dict(tag.split(":", 1) for tag in metric.tags)
        key = (tags["signature"], tags["source"])
        found[key] = found.get(key, 0) + metric.value
    return found


def own_connections(box: Sandbox) -> tuple[int, int]:
    """The check's connections: to PostgreSQL, and to the PgBouncer console."""
    with psycopg.connect(box.postgres.dsn(), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'datadog-django-db'")
        postgres = row.fetchone()[0]
    with psycopg.connect(
        host="127.0.0.1", port=box.pgbouncer.port, user=SUPERUSER, password=box.pgbouncer.users[SUPERUSER],
        dbname="pgbouncer", autocommit=True, cursor_factory=psycopg.ClientCursor,
    ) as admin:  # fmt: skip
        cursor = admin.execute("SHOW CLIENTS")
        user = [column.name for column in cursor.description].index("user")
        console = sum(1 for row in cursor.fetchall() if row[user] == Sandbox.MONITOR_USER)
    return postgres, console


def healthy_run(aggregator, dd_run_check, check) -> None:
    aggregator.reset()
    dd_run_check(check)
    aggregator.assert_service_check(POSTGRES, AgentCheck.OK)
    aggregator.assert_service_check(PGBOUNCER, AgentCheck.OK)


def terminate(box: Sandbox, check: DjangoDbCheck) -> None:
    box.psql(f"SELECT pg_terminate_backend({check.postgres.conn.info.backend_pid}, 5000)")  # returns once it is gone


BREAKS: dict[str, tuple[Callable[[Sandbox, DjangoDbCheck], None], set[str]]] = {
    # How the check's PostgreSQL backend goes away, and what closed it: the server says 57P01 before it
    # closes; in an immediate shutdown it may be gone before its notice is sent.
    "pg_terminate_backend": (terminate, {"admin_shutdown"}),
    "pg_ctl restart -m fast": (lambda box, _: box.postgres.restart("fast"), {"admin_shutdown"}),
    "pg_ctl restart -m immediate": (
        lambda box, _: box.postgres.restart("immediate"),
        {"admin_shutdown", "server_closed"},
    ),
}


@pytest.mark.parametrize("how", list(BREAKS))
def test_postgres_back_before_the_next_run_is_no_page(aggregator, dd_run_check, box, check, how, caplog):
    caplog.set_level(logging.INFO)
    breaks, signatures = BREAKS[how]
    healthy_run(aggregator, dd_run_check, check)
    pid = check.postgres.conn.info.backend_pid
    breaks(box, check)
    healthy_run(aggregator, dd_run_check, check)
    health = aggregator.service_checks(HEALTH)[0]
    print(f"\n[{how}] health {health.status} {health.message!r}; errors {errors(aggregator)}")
    assert health.status == AgentCheck.OK, health.message
    counted = errors(aggregator)
    assert list(counted.values()) == [1]  # what closed the connection, counted once
    assert {signature for signature, source in counted if source == "postgres"} <= signatures
    assert metric_values(aggregator, "django_db.postgres.max_connections") == [30]  # the run was done
    assert check.postgres.conn.info.backend_pid != pid
    assert own_connections(box) == (1, 1)
    healthy_run(aggregator, dd_run_check, check)
    assert errors(aggregator) == {}
    # A restart is named once, a terminated connection is none
    named = caplog.text.count(f"PostgreSQL 127.0.0.1:{box.postgres.port} restarted (its start time moved")
    assert named == (0 if how == "pg_terminate_backend" else 1), caplog.text


def test_pgbouncer_restart_is_no_page(aggregator, dd_run_check, box, check):
    healthy_run(aggregator, dd_run_check, check)
    box.pgbouncer.stop()
    box.pgbouncer.start()
    healthy_run(aggregator, dd_run_check, check)
    health = aggregator.service_checks(HEALTH)[0]
    print(f"\n[PgBouncer restart] health {health.status} {health.message!r}; errors {errors(aggregator)}")
    assert health.status == AgentCheck.OK, health.message
    assert errors(aggregator) == {("server_closed", "pgbouncer"): 1}
    assert metric_values(aggregator, "django_db.pgbouncer.max_client_conn") == [100]
    assert own_connections(box) == (1, 1)


def test_postgres_really_down_is_critical(aggregator, dd_run_check, box, check):
    healthy_run(aggregator, dd_run_check, check)
    box.postgres.stop("fast")
    try:
        elapsed, message = timed_critical_run(aggregator, dd_run_check, check, POSTGRES)
        print(f"\n[PostgreSQL stopped] {message}")
        assert "connection_refused" in message, message
        assert elapsed < 2 + 1 + 1.5, elapsed  # within connect_timeout and query_timeout
        # What closed the kept connection, and the refusal of a new one: each counted once.
        assert errors(aggregator) == {("admin_shutdown", "postgres"): 1, ("connection_refused", "postgres"): 1}
        aggregator.assert_service_check(HEALTH, AgentCheck.CRITICAL)
        aggregator.assert_service_check(PGBOUNCER, AgentCheck.OK)
        assert check.postgres.conn is None
    finally:
        box.postgres.restart()
    healthy_run(aggregator, dd_run_check, check)
    assert own_connections(box) == (1, 1)


def test_pgbouncer_really_down_is_critical(aggregator, dd_run_check, box, check):
    healthy_run(aggregator, dd_run_check, check)
    box.pgbouncer.stop()
    try:
        elapsed, message = timed_critical_run(aggregator, dd_run_check, check, PGBOUNCER)
        print(f"\n[PgBouncer stopped] {message}")
        assert "connection_refused" in message, message
        assert elapsed < 2 + 1 + 1.5, elapsed
        assert errors(aggregator) == {("server_closed", "pgbouncer"): 1, ("connection_refused", "pgbouncer"): 1}
        assert check.pgbouncer.conn is None
    finally:
        box.pgbouncer.start()
    healthy_run(aggregator, dd_run_check, check)
    assert own_connections(box) == (1, 1)


def test_a_hung_server_is_not_retried(aggregator, dd_run_check, box, check):
    """A timeout of the check's own is no broken connection: CRITICAL after query_timeout, not twice that."""
    healthy_run(aggregator, dd_run_check, check)
    box.pgbouncer.pause()
    try:
        elapsed, message = timed_critical_run(aggregator, dd_run_check, check, PGBOUNCER)
        assert "connect_timeout" in message, message
        assert elapsed < 1 + 1, elapsed
    finally:
        box.pgbouncer.resume()
    healthy_run(aggregator, dd_run_check, check)
