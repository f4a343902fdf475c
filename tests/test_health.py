"""connection_health and config_alignment under real conditions on real servers."""

from __future__ import annotations

import os
import threading
import time

import psycopg
import pytest
from datadog_checks.base import AgentCheck

from datadog_checks.django_db import DjangoDbCheck
from django_db_tools.sandbox import SUPERUSER, SUPERUSER_PASSWORD, Sandbox

from .conftest import APP_PASSWORD, metric_values

HEALTH = "django_db.connection_health"


def health(aggregator):
    checks = aggregator.service_checks(HEALTH)
    assert len(checks) == 1, checks
    print(f"\n[{checks[0].status}] {checks[0].message}")  # shown with -s: the message an operator reads
    return checks[0]


def errors(aggregator, signature, source, *tags):
    return sum(metric_values(aggregator, "django_db.errors", f"signature:{signature}", f"source:{source}", *tags))


def connect(port, user=SUPERUSER, password=SUPERUSER_PASSWORD, dbname="postgres", **kwargs):
    return psycopg.connect(
        host="127.0.0.1", port=port, user=user, password=password, dbname=dbname, autocommit=True,
        connect_timeout=5, sslmode="disable", **kwargs,
    )  # fmt: skip


@pytest.fixture
def held():
    conns: list[psycopg.Connection] = []
    yield conns
    for conn in conns:
        conn.close()


def test_postgres_out_of_slots(aggregator, dd_run_check, held):
    with Sandbox(max_connections=6) as box:
        box.psql(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'")
        instance = {"postgres": box.instance(False)["postgres"], "log_files": [str(box.postgres.logfile)]}
        check = DjangoDbCheck("django_db", {}, [instance])
        dd_run_check(check)  # the check holds one of the 3 usable slots from now on
        held += [connect(box.postgres.port, "app", APP_PASSWORD, application_name="web") for _ in range(2)]
        with pytest.raises(psycopg.OperationalError, match="remaining connection slots are reserved"):
            connect(box.postgres.port, "app", APP_PASSWORD)
        held += [connect(box.postgres.port) for _ in range(3)]  # the superuser's reserved slots
        with pytest.raises(psycopg.OperationalError, match="too many clients already"):
            connect(box.postgres.port)
        aggregator.reset()
        dd_run_check(check)
        status = health(aggregator)
        assert status.status == AgentCheck.CRITICAL
        assert status.message.startswith(
            "CRITICAL: 6 connections for 3 usable slots: 3 of the reserved slots taken (200%"
        )
        assert "CRITICAL: reserved_slots seen (1 from log)" in status.message
        assert "CRITICAL: too_many_clients seen (1 from log)" in status.message
        assert errors(aggregator, "too_many_clients", "log", f"log_file:{box.postgres.logfile}") == 1
        assert errors(aggregator, "reserved_slots", "log", f"log_file:{box.postgres.logfile}") == 1
        aggregator.assert_service_check("django_db.postgres.can_connect", AgentCheck.OK)

        fresh = DjangoDbCheck("django_db", {}, [instance])  # a new connection is refused too
        aggregator.reset()
        dd_run_check(fresh)
        aggregator.assert_service_check("django_db.postgres.can_connect", AgentCheck.CRITICAL)
        message = aggregator.service_checks("django_db.postgres.can_connect")[0].message
        assert "too_many_clients" in message and "max_connections" in message
        assert errors(aggregator, "too_many_clients", "postgres", f"postgres_server:127.0.0.1:{box.postgres.port}") == 1
        check.cancel()
        fresh.cancel()


def test_pgbouncer_at_max_client_conn(aggregator, dd_run_check, held):
    with Sandbox(max_connections=30, max_client_conn=4) as box:
        instance = {**box.instance(), "log_files": [str(box.pgbouncer.logfile)]}
        check = DjangoDbCheck("django_db", {}, [instance])
        dd_run_check(check)
        held += [connect(box.pgbouncer.port, application_name="web") for _ in range(3)]
        with pytest.raises(psycopg.OperationalError, match=r"no more connections allowed \(max_client_conn\)"):
            connect(box.pgbouncer.port)
        aggregator.reset()
        dd_run_check(check)
        status = health(aggregator)
        assert status.status == AgentCheck.CRITICAL
        assert "CRITICAL: 4 of 4 PgBouncer client connections in use (100% of max_client_conn)" in status.message
        assert "CRITICAL: max_client_conn seen (1 from log)" in status.message
        # PgBouncer still lets clients of its admin console in past the limit: a new check connects.
        fresh = DjangoDbCheck("django_db", {}, [instance])
        aggregator.reset()
        dd_run_check(fresh)
        aggregator.assert_service_check("django_db.pgbouncer.can_connect", AgentCheck.OK)
        assert health(aggregator).message.startswith("CRITICAL: 5 of 4 PgBouncer client connections in use (125%")
        check.cancel()
        fresh.cancel()


def test_client_hits_query_wait_timeout(aggregator, dd_run_check, held):
    with Sandbox(max_connections=30, default_pool_size=1, query_wait_timeout=1) as box:
        instance = {**box.instance(), "log_files": [str(box.pgbouncer.logfile)]}
        check = DjangoDbCheck("django_db", {}, [instance])
        dd_run_check(check)
        holder, waiter = (connect(box.pgbouncer.port, application_name="web") for _ in range(2))
        held += [holder, waiter]
        holder.execute("BEGIN")
        holder.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError, match="query_wait_timeout"):
            waiter.execute("SELECT 1")
        aggregator.reset()
        dd_run_check(check)
        status = health(aggregator)
        assert status.status == AgentCheck.CRITICAL
        assert "CRITICAL: query_wait_timeout seen (1 from log)" in status.message
        assert errors(aggregator, "query_wait_timeout", "log") == 1
        check.cancel()


def test_clients_waiting_at_pgbouncer(aggregator, dd_run_check, held):
    with Sandbox(max_connections=30, default_pool_size=1) as box:
        check = DjangoDbCheck(
            "django_db", {}, [{**box.instance(), "thresholds": {"pgbouncer_maxwait_seconds": {"warning": 1}}}]
        )
        holder, waiter = (connect(box.pgbouncer.port, application_name="web") for _ in range(2))
        held += [holder, waiter]
        holder.execute("BEGIN")
        holder.execute("SELECT 1")
        thread = threading.Thread(target=lambda: waiter.execute("SELECT 1"), daemon=True)
        thread.start()
        time.sleep(1.3)
        dd_run_check(check)
        status = health(aggregator)
        assert "1 clients waiting at PgBouncer pool postgres/postgres, the oldest for 1." in status.message
        holder.execute("COMMIT")
        thread.join(5)
        check.cancel()


def test_log_grows_rotates_and_is_truncated(aggregator, dd_run_check, held):
    with Sandbox(max_connections=30, max_client_conn=2) as box:
        log = box.pgbouncer.logfile
        check = DjangoDbCheck("django_db", {}, [{"postgres": box.instance()["postgres"], "log_files": [str(log)]}])
        dd_run_check(check)
        held.append(connect(box.pgbouncer.port))
        held.append(connect(box.pgbouncer.port))

        def refused(times):
            for _ in range(times):
                with pytest.raises(psycopg.OperationalError, match="max_client_conn"):
                    connect(box.pgbouncer.port)
            time.sleep(0.2)

        def counted():
            aggregator.reset()
            dd_run_check(check)
            return errors(aggregator, "max_client_conn", "log")

        refused(2)
        assert counted() == 2  # grown
        assert counted() == 0  # nothing new
        refused(1)  # written to the file about to be rotated
        os.rename(log, f"{log}.1")
        box.pgbouncer.reload()  # PgBouncer reopens its log file on SIGHUP
        refused(3)
        assert log.exists()
        assert counted() == 4  # the old file's last line, then the new file from its start
        os.truncate(log, 0)
        refused(1)
        assert counted() == 1  # truncated: read again from the start
        check.cancel()


def test_stopped_server_and_wrong_password(aggregator, dd_run_check, sandbox):
    bad = {"postgres": {**sandbox.postgres.instance(Sandbox.MONITOR_USER, "not-the-password")}}
    check = DjangoDbCheck("django_db", {}, [bad])
    dd_run_check(check)
    status = health(aggregator)
    assert status.status == AgentCheck.CRITICAL
    assert status.message.startswith("CRITICAL: auth_failed seen (1 from postgres): The server refused the credentials")
    assert "not-the-password" not in status.message
    message = aggregator.service_checks("django_db.postgres.can_connect")[0].message
    assert "auth_failed" in message and "not-the-password" not in message

    with Sandbox(max_connections=30) as box:
        check = DjangoDbCheck("django_db", {}, [box.instance()])
        box.postgres.stop()
        box.pgbouncer.stop()
        aggregator.reset()
        dd_run_check(check)
        status = health(aggregator)
        assert status.status == AgentCheck.CRITICAL
        assert "CRITICAL: connection_refused seen (1 from pgbouncer, 1 from postgres)" in status.message
        check.cancel()


def test_leak_message_names_app_and_normalised_query(aggregator, dd_run_check, sandbox, clients):
    leaky = clients.connect(app="leaky-app")
    leaky.execute("SELECT id FROM items WHERE id = 1 AND name = 'one'")
    time.sleep(1.2)
    base = {"postgres": sandbox.postgres.instance(Sandbox.MONITOR_USER, Sandbox.MONITOR_PASSWORD),
            "leak_idle_seconds": 1, "applications": {"include": ["^leaky-app$"]}}  # fmt: skip
    dd_run_check(DjangoDbCheck("django_db", {}, [base]))
    quiet = health(aggregator).message
    assert "WARNING: 1 connections of app=leaky-app idle for over 1 s (leaked)" in quiet
    assert "SELECT" not in quiet
    aggregator.reset()
    dd_run_check(DjangoDbCheck("django_db", {}, [{**base, "report_leak_queries": True}]))
    loud = health(aggregator).message
    assert "suspects: app=leaky-app from 127.0.0.1 idle" in loud
    assert "last query: SELECT id FROM items WHERE id = ? AND name = ?" in loud
    assert "'one'" not in loud


def test_hidden_backends_ask_for_pg_monitor(aggregator, dd_run_check, sandbox, clients):
    clients.many(2, app="hidden-app")
    instance = {
        "postgres": sandbox.postgres.instance("plain", APP_PASSWORD),
        "applications": {"include": ["^hidden-app$"]},
    }
    dd_run_check(DjangoDbCheck("django_db", {}, [instance]))
    status = health(aggregator)
    assert status.status == AgentCheck.WARNING
    assert "WARNING: 2 backends are hidden from the monitoring role: GRANT pg_monitor TO plain" in status.message


def test_idle_in_transaction_over_thresholds(aggregator, dd_run_check, sandbox, clients):
    for conn in clients.many(3, app="stuck-app"):
        conn.execute("BEGIN")
        conn.execute("SELECT 1")
    time.sleep(1.1)
    instance = {
        "postgres": sandbox.postgres.instance(Sandbox.MONITOR_USER, Sandbox.MONITOR_PASSWORD),
        "applications": {"include": ["^stuck-app$"]},
        "thresholds": {"idle_in_transaction_seconds": {"warning": 1}, "idle_in_transaction_count": {"critical": 3}},
    }
    dd_run_check(DjangoDbCheck("django_db", {}, [instance]))
    status = health(aggregator)
    assert status.status == AgentCheck.CRITICAL
    # One finding: how many, of which applications, the oldest; the worse of its two thresholds.
    assert "CRITICAL: 3 connections idle in transaction (app=stuck-app 3), the oldest for 1 s (app=stuck-app)" in (
        status.message
    )
    assert status.message.count("idle in transaction") == 1


def test_session_mode_with_conn_max_age(aggregator, dd_run_check):
    with Sandbox(max_connections=30, pool_mode="session", server_idle_timeout=120, default_pool_size=40) as box:
        box.psql("ALTER ROLE postgres SET statement_timeout = '30s'")
        client = connect(box.pgbouncer.port, application_name="web")
        client.execute("SELECT 1")
        check = DjangoDbCheck("django_db", {}, [{**box.instance(), "conn_max_age": 300}])
        dd_run_check(check)
        alignment = aggregator.service_checks("django_db.config_alignment")
        assert len(alignment) == 1 and alignment[0].status == AgentCheck.WARNING
        print(f"\n[alignment] {alignment[0].message}")
        assert alignment[0].message == (
            "conn_max_age=300 s while PgBouncer pools postgres in session mode: every Django thread pins a server "
            "connection; use pool_mode=transaction; "
            "PgBouncer may open 40 server connections (pool sizes plus reserve pools) but PostgreSQL has 27 usable "
            "slots: lower the pool sizes or set max_db_connections"
        )
        client.close()
        check.cancel()


def test_aligned_stack_is_ok(aggregator, dd_run_check, sandbox):
    # The server's own statement_timeout applies to every role without one of its own.
    sandbox.psql("ALTER SYSTEM SET statement_timeout = '30s'")
    sandbox.psql("SELECT pg_reload_conf()")
    deadline = time.monotonic() + 10
    while sandbox.psql("SHOW statement_timeout").strip() != "30s" and time.monotonic() < deadline:
        time.sleep(0.05)  # the reload reaches new sessions once the postmaster has read the file
    try:
        instance = {**sandbox.instance(), "conn_max_age": 60, "applications": {"include": ["^nothing$"]}}
        dd_run_check(DjangoDbCheck("django_db", {}, [instance]))
    finally:
        sandbox.psql("ALTER SYSTEM RESET statement_timeout")
        sandbox.psql("SELECT pg_reload_conf()")
    aggregator.assert_service_check("django_db.config_alignment", AgentCheck.OK)
